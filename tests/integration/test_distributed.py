"""``safe train`` in 2 processes (torchrun, gloo on CPU): DDP really runs, ranks stay identical, resume.

Each run goes through the real CLI (``safe_av.cli train``) inside a small driver written into tmp.
The driver only *observes* (it records, per rank, the world size, the curriculum stage after every
step and the final trainable weights) and, with ``perturb``, makes rank 1 disagree on purpose:

- some of rank 1's batches lose their audio (``use_audio=False``): the projector and fusion get no
  gradient there, which must neither hang DDP nor let the ranks' weights drift apart;
- rank 1's own curriculum never decides to advance: the stage must still change on both ranks at
  the same step (rank 0 decides, the others follow);
- at steps 3 and 6 rank 1's second (last, gradient-synchronising) micro-batch comes out empty, as when none
  of its samples loads: every rank must skip it and all-reduce on the first one instead, or the ranks
  would step on different gradients.

With ``stop_after`` the first attempt ends right after that step's checkpoint (as a crash would);
``torchrun --max-restarts 1`` then starts both workers again and the Trainer resumes by itself
(``TORCHELASTIC_RESTART_COUNT``).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from safe_av.config import config_to_yaml
from tests.integration.conftest import losses_by_step as _losses, tiny_train_config

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

REPO = Path(__file__).resolve().parents[2]

DRIVER = r'''
import json, hashlib, os, sys
from pathlib import Path

from safetensors.torch import save_file

from safe_av import cli
from safe_av.training import curriculum, loop

dump, opts, argv = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
rank, restart = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
trace = {"stages": [], "no_audio_steps": [], "resumed_from": None, "emptied_steps": []}

if opts.get("perturb") and rank == 1:
    curriculum.Curriculum._advance_reason = lambda self, step: None  # rank 1 alone would never advance

_init = loop.Trainer.__init__
def __init__(self, *a, **kw):
    _init(self, *a, **kw)
    if opts.get("stop_after") and restart == 0:
        self.stop_after = opts["stop_after"]
loop.Trainer.__init__ = __init__

_ostep, micro = loop.Trainer._optimizer_step, {"i": None, "step": None}
def _optimizer_step(self, *a, **kw):
    micro["i"], micro["step"] = 0, self.state.global_step + 1
    try:
        return _ostep(self, *a, **kw)
    finally:
        micro["i"] = None
loop.Trainer._optimizer_step = _optimizer_step

_next = loop.BatchStream.next
def next_(self):
    batch = _next(self)
    if micro["i"] is not None:
        micro["i"] += 1
        if opts.get("perturb") and rank == 1 and micro["i"] == 2 and micro["step"] in (3, 6):
            trace["emptied_steps"].append(micro["step"])
            # the collate's own empty batch for as many unloadable samples as this one had
            return self.collate([None] * (int(batch.get("skipped", 0)) + len(batch.get("meta", []))))
    return batch
loop.BatchStream.next = next_

_compute_loss = loop.Trainer.compute_loss
def compute_loss(self, model, batch, w):
    if (opts.get("perturb") and rank == 1 and self.state.global_step % 2 == 1
            and bool(batch["has_audio"].any())):
        batch = dict(batch, use_audio=False)  # this rank's batch has no audio tokens at all
        trace["no_audio_steps"].append(self.state.global_step + 1)
    return _compute_loss(self, model, batch, w)
loop.Trainer.compute_loss = compute_loss

_tick = loop.Trainer._curriculum_tick
def _curriculum_tick(self, stream):
    _tick(self, stream)
    trace["stages"].append([self.state.global_step, self.curriculum.index, stream.audio_ratio,
                            stream.epoch, stream.position])
loop.Trainer._curriculum_tick = _curriculum_tick

_resume = loop.Trainer._maybe_resume_state
def _maybe_resume_state(self):
    path = _resume(self)
    trace["resumed_from"] = None if path is None else [str(path), self.state.global_step]
    return path
loop.Trainer._maybe_resume_state = _maybe_resume_state

_train = loop.Trainer.train
def train(self):
    metrics = _train(self)
    params = {n: p.detach().contiguous() for n, p in self.model.trainable_parameters().items()}
    save_file(params, str(dump / f"rank{rank}.safetensors"))
    full = hashlib.sha256()
    for name, tensor in sorted(self.model.state_dict().items()):
        full.update(name.encode() + tensor.detach().float().contiguous().numpy().tobytes())
    record = dict(trace, rank=self.acc.process_index, world_size=self.acc.num_processes,
                  distributed_type=str(self.acc.distributed_type), restart=restart, steps=self.state.global_step,
                  wrapped=type(self.ddp_model).__name__, full_sha256=full.hexdigest())
    (dump / f"rank{rank}.json").write_text(json.dumps(record))
    return metrics
loop.Trainer.train = train

sys.exit(cli.main(argv))
'''


# the tiny config's three phases with 2 samples per rank (the small corpus has only 4 AudioCaps clips
# for training, and each rank draws from its own half)
PHASES = (
    "[{name: p1, train: [projector], lr: {projector: 1.0e-3}, datasets: {audiocaps: 1.0}, max_steps: 2, "
    "batch_size: 2}, {name: p2, train: [projector, fusion], lr: {projector: 1.0e-3, fusion: 1.0e-3}, "
    "datasets: {musicavqa: 1.0, vqav2: 1.0}, max_steps: 3, batch_size: 2, curriculum: true}, "
    "{name: p3, train: [projector, fusion, base], unfreeze: [language_projection], "
    "lr: {projector: 1.0e-3, fusion: 1.0e-3, base: 1.0e-3}, datasets: {musicavqa: 1.0, vqav2: 1.0}, "
    "max_steps: 4, batch_size: 2, curriculum: true}]")


def _launch(tmp: Path, name: str, config: Path, opts: dict, *, max_restarts: int = 0) -> tuple[Path, Path, float]:
    """torchrun --standalone --nproc_per_node 2 <driver> ... train; returns (run dir, dump dir, seconds)."""
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    run, dump = tmp / name, tmp / f"{name}-dump"
    dump.mkdir()
    # ACCELERATE_USE_CPU: without a GPU accelerate forms no process group under torchrun otherwise;
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: a restart otherwise reads the previous round's gloo addresses
    env = dict(os.environ, ACCELERATE_USE_CPU="true", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           f"--max-restarts={max_restarts}", str(driver), str(dump), json.dumps(opts),
           "train", "--config", str(config), "--output-dir", str(run)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.time() - t0
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return run, dump, seconds


def _ranks(dump: Path) -> list[dict]:
    return [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_setup(small_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # dropout on: each rank draws its own random numbers (rank 1's audio-less batches draw fewer), so an
    # exact restart needs every rank's own RNG states in the checkpoint
    cfg = tiny_train_config(small_corpus, tmp, **{
        "train.optim.grad_accum": 2, "train.checkpoint_every": 1, "data.feature_cache": f"{tmp}/features",
        "model.projector.dropout": 0.1, "model.fusion.dropout": 0.1, "model.lora.enabled": False,
        "train.phases": PHASES})
    config = tmp / "config.yaml"
    config.write_text(config_to_yaml(cfg))
    run, dump, seconds = _launch(tmp, "run", config, {"perturb": True})
    print(f"2-process run: {seconds:.1f} s")
    return tmp, config, run, dump


def test_two_processes_train_in_lockstep(ddp_setup):
    tmp, _, run, dump = ddp_setup
    r0, r1 = _ranks(dump)
    # really two processes of one DDP job
    assert [r0["rank"], r1["rank"]] == [0, 1]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["distributed_type"] == r1["distributed_type"] == "DistributedType.MULTI_CPU"
    assert r0["wrapped"] != "SAFEModel"  # the model the loop steps is the DDP-wrapped one
    assert r0["steps"] == r1["steps"] == 9
    # rank 1 had batches without any audio in phases 1-2 (projector/fusion unused there) and DDP coped
    assert r1["no_audio_steps"] and not r0["no_audio_steps"]
    # rank 1's last micro-batch of steps 3 and 6 was empty: both ranks skipped it and stayed together
    assert r1["emptied_steps"] == [3, 6] and r0["emptied_steps"] == []
    # trainable weights bit-identical on both ranks, and the whole model too
    a, b = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("projector") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert r0["full_sha256"] == r1["full_sha256"]
    # the curriculum changed stage on both ranks at the same steps although rank 1 alone never would
    assert r0["stages"] == r1["stages"]
    assert [s[1] for s in r0["stages"]] == [0, 1, 1, 2, 2, 3, 3]  # max_stage_steps=2 from phase 2's first step
    # rank 0 wrote the run's files; the weights it saved are the ones both ranks hold
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 9
    assert metrics["skipped_samples"] == 4  # rank 1's two emptied micro-batches of 2: counted over all ranks
    assert list(metrics["curriculum_stages"]) == ["foundation", "development", "advanced", "mastery"]
    saved = load_file(str(run / "adapter" / "adapter.safetensors"))
    for k, v in saved.items():
        if k in a:
            assert torch.equal(v, a[k]), k


def test_torchrun_restart_resumes_from_rank0_checkpoint(ddp_setup):
    tmp, config, ref, _ = ddp_setup
    run, dump, seconds = _launch(tmp, "restarted", config, {"perturb": True, "stop_after": 4}, max_restarts=1)
    print(f"2-process run killed at step 4 and restarted by torchrun: {seconds:.1f} s")
    r0, r1 = _ranks(dump)
    assert r0["restart"] == r1["restart"] == 1  # the dump comes from the second attempt
    # both ranks resumed from the checkpoint rank 0 saved at step 4
    assert r0["resumed_from"] == r1["resumed_from"]
    assert r0["resumed_from"][1] == 4 and Path(r0["resumed_from"][0]).is_relative_to(run)
    # checkpoints hold each rank's own RNG states (the one resumed from is rotated away by now)
    from safe_av.training.checkpoint import find_latest

    latest = find_latest(run)
    assert (latest / "rng_rank0.json").is_file() and (latest / "rng_rank1.json").is_file()
    # and the run goes on as the uninterrupted one (two uninterrupted launches agree bit for bit): identical
    # up to the kill, then equal within a few float32 ulps (dropout on, per-rank RNG restored). Phase 3's
    # last steps have differed by 1-2 ulps between restarted and uninterrupted runs (step 8 or 9 of 9,
    # not reproducibly the same step), a rounding difference whose source is not found (see docs/distributed.md);
    # the single-process resume test checks bit-exactness to the end.
    got, want = _losses(run), _losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, 10))
    for step in want:
        if step <= 4:
            assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), f"step {step}: {got[step]} != {want[step]}"
    a = load_file(str(ref / "adapter" / "adapter.safetensors"))
    b = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    w0, w1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
