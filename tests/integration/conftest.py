"""A tiny end-to-end set-up: the small synthetic corpus, written once per session."""

import json

import pytest

from safe_av.config import load_config


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    from safe_av.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("corpus")
    write_synthetic(root, seed=0, small=True)
    return root


def tiny_train_config(root, tmp, **overrides):
    """Three short phases on the small corpus; phase 3 unfreezes language_projection."""
    sets = [
        f"data.root={root}", "data.synthetic=false", f"train.pretrain.cache_dir={tmp}/base",
        "train.pretrain.enabled=true", "train.pretrain.epochs=2", "train.pretrain.batch_size=8",
        "train.pretrain.audio.enabled=false", "train.pretrain.vision.enabled=false",
        "train.pretrain.sound_text.enabled=false",
        "train.log_every=1", "train.checkpoint_every=1000", "train.trackers=[]",
        "curriculum.eval_every=3", "curriculum.eval_samples=4", "curriculum.min_stage_steps=1",
        "curriculum.max_stage_steps=2", "eval.batch_size=8", "eval.max_new_tokens=2",
        "loss.fisher_batches=2", "model.num_audio_tokens=4", "model.projector.hidden_dim=32",
        "train.optim.warmup_steps=2",
        "train.phases=[{name: p1, train: [projector], lr: {projector: 1.0e-3}, datasets: {audiocaps: 1.0}, "
        "max_steps: 2, batch_size: 4}, {name: p2, train: [projector, fusion], lr: {projector: 1.0e-3, fusion: 1.0e-3}, "
        "datasets: {musicavqa: 1.0, vqav2: 1.0}, max_steps: 3, batch_size: 4, curriculum: true}, "
        "{name: p3, train: [projector, fusion, base], unfreeze: [language_projection], "
        "lr: {projector: 1.0e-3, fusion: 1.0e-3, base: 1.0e-3}, datasets: {musicavqa: 1.0, vqav2: 1.0}, "
        "max_steps: 4, batch_size: 4, curriculum: true}]",
    ]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    return load_config("configs/demo.yaml", sets)


def losses_by_step(run) -> dict:
    """step -> logged total loss, from a run folder's metrics.jsonl."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss/total" in r:
            out[r["step"]] = r["loss/total"]
    return out
