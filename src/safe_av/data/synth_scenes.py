"""Scenes of the synthetic corpus: instruments, their sound, their picture, and the questions.

A `Scene` is what one synthetic "video" shows and plays; `render_audio` and
`draw_scene` turn it into a waveform and a frame; `scene_questions` asks the
MUSIC-AVQA (scenario, type) questions about it. `safe_av.data.synthetic` writes
these to disk in the official formats (its docstring describes the design).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy.signal import lfilter

INSTRUMENTS = ("piano", "violin", "flute", "drum")
SHAPE_OF = {"piano": "square", "violin": "triangle", "flute": "circle", "drum": "diamond"}
COLOR_OF = {"piano": (40, 80, 220), "violin": (215, 45, 40), "flute": (35, 165, 70), "drum": (235, 190, 25)}
POSITIONS = ("left", "middle", "right")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
LEVELS = (1.0, 0.5, 0.25)
LEVEL_WORDS = {1.0: "loud", 0.5: "medium", 0.25: "quiet"}
"""How a sound description (``training/pretrain_sound_text.py``) names each loudness level."""
DURATION_BUCKETS = ((2.0, 4.0), (6.0, 9.0), (11.0, 13.0))
BUCKET_P = (0.5, 0.3, 0.2)
SOUNDING_P = {2: (0.75, 0.25), 3: (0.4, 0.4, 0.2)}
"""P(1, 2, 3 instruments sound | 2 or 3 visible): mostly someone stays silent."""
IMAGE_SIZE = 64
NOTE_S = 0.3
MIN_IOI_S = 0.45
EVENT_HORIZON_S = 9.5
"""Every note starts and ends in the first 9.5 s: encoders see 10 s, so the answers survive truncation;
longer ("hard") clips end in silence."""


@dataclass
class Voice:
    """One sounding instrument."""

    onset: float
    starts: list[float]
    gain: float

    @property
    def span(self) -> float:
        return self.starts[-1] + NOTE_S - self.onset


@dataclass
class Scene:
    """What a synthetic video shows and plays."""

    duration: float
    position: dict[str, str]  # visible instrument -> slot
    voices: dict[str, Voice] = field(default_factory=dict)  # sounding subset
    ramp: tuple[float, float] = (1.0, 1.0)  # mix gain at start and end

    @property
    def visible(self) -> list[str]:
        return sorted(self.position, key=lambda n: POSITIONS.index(self.position[n]))

    @property
    def by_onset(self) -> list[str]:
        return sorted(self.voices, key=lambda n: self.voices[n].onset)

    def gain(self, name: str) -> float:
        return self.voices[name].gain if name in self.voices else 0.0


# ----------------------------------------------------------------------------- scenes
def _duration(rng: np.random.Generator) -> float:
    lo, hi = DURATION_BUCKETS[rng.choice(len(DURATION_BUCKETS), p=BUCKET_P)]
    return round(float(rng.uniform(lo, hi)), 2)


def _voices(names: list[str], duration: float, rng: np.random.Generator) -> dict[str, Voice]:
    """Staggered entries (>= 0.4 s apart), distinct loudness levels, 1-5 notes each."""
    order = list(rng.permutation(names))
    levels = rng.permutation(len(LEVELS))
    voices = {}
    for k, name in enumerate(order):
        onset = round(float(rng.uniform(0.0, 0.2)) + 0.4 * k, 3)
        window = min(duration, EVENT_HORIZON_S) - 0.05 - onset
        cap = min(5, 1 + int((window - NOTE_S) // MIN_IOI_S))
        n = int(rng.integers(1, cap + 1))
        need = NOTE_S + MIN_IOI_S * (n - 1)
        span = float(rng.uniform(need, max(need, window)))
        starts = [round(s, 3) for s in np.linspace(onset, onset + span - NOTE_S, n)]
        voices[str(name)] = Voice(onset=onset, starts=starts, gain=LEVELS[levels[k]])
    return voices


def make_scene(rng: np.random.Generator, *, max_visible: int = 3) -> Scene:
    """Random scene: 2..max_visible instruments in distinct slots, a non-empty sounding subset."""
    n_visible = int(rng.integers(2, max_visible + 1))
    names = [INSTRUMENTS[i] for i in rng.choice(len(INSTRUMENTS), n_visible, replace=False)]
    slots = rng.choice(len(POSITIONS), n_visible, replace=False)
    duration = _duration(rng)
    n_sounding = 1 + int(rng.choice(n_visible, p=SOUNDING_P[n_visible]))
    sounding = [names[i] for i in rng.choice(n_visible, n_sounding, replace=False)]
    ramp = (round(float(rng.uniform(0.6, 1.0)), 2), round(float(rng.uniform(0.6, 1.0)), 2))
    position = {n: POSITIONS[s] for n, s in zip(names, slots, strict=True)}
    return Scene(duration=duration, position=position, voices=_voices(sounding, duration, rng), ramp=ramp)


# ------------------------------------------------------------------------------ audio
def _note(name: str, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One note of an instrument; the timbre is the class cue."""
    length = 0.15 if name == "drum" else NOTE_S
    t = np.arange(int(length * sr)) / sr
    nyquist = 0.45 * sr
    if name == "drum":
        noise = lfilter([0.15], [1.0, -0.85], rng.standard_normal(t.size))
        return (noise / (np.abs(noise).max() + 1e-9) * 0.7 + 0.5 * np.sin(2 * np.pi * 80 * t)) * np.exp(-t * 25)
    if name == "piano":
        wave = sum(np.sin(2 * np.pi * k * 262 * t) / k for k in range(1, 7) if k * 262 < nyquist)
        return wave * np.exp(-t * 8) * np.minimum(1, t / 0.005)
    if name == "violin":
        phase = 2 * np.pi * 392 * t + 0.5 * np.sin(2 * np.pi * 5.5 * t)  # vibrato, ±2.75 Hz
        wave = sum(np.sin(k * phase) / k for k in range(1, 9) if k * 392 < nyquist)
        return wave * np.minimum(1, t / 0.05) * np.minimum(1, (length - t) / 0.05)
    wave = np.sin(2 * np.pi * 784 * t) + 0.2 * np.sin(2 * np.pi * 1568 * t) + 0.05 * rng.standard_normal(t.size)
    return wave * np.minimum(1, t / 0.03) * np.minimum(1, (length - t) / 0.03)


def render_audio(scene: Scene, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Mono mix (T,) float32 with peak 0.9."""
    n = int(round(scene.duration * sr))
    mix = np.zeros(n)
    for name in sorted(scene.voices):
        voice = scene.voices[name]
        for start in voice.starts:
            note = _note(name, sr, rng)
            note = note / (np.abs(note).max() + 1e-9) * voice.gain
            i = int(start * sr)
            mix[i : i + note.size] += note[: max(0, n - i)]
    mix *= np.linspace(scene.ramp[0], scene.ramp[1], n)
    return (mix / (np.abs(mix).max() + 1e-9) * 0.9).astype(np.float32)


# ----------------------------------------------------------------------------- images
def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple) -> None:
    if shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)


def draw_objects(objects: list[tuple[str, tuple, str]], rng: np.random.Generator) -> bytes:
    """JPEG bytes of a 64x64 image with (shape, colour, slot) objects."""
    shade = int(rng.integers(200, 246))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (shade, shade, shade - 10))
    draw = ImageDraw.Draw(img)
    for shape, color, slot in objects:
        cx = (POSITIONS.index(slot) + 0.5) * IMAGE_SIZE / 3 + float(rng.uniform(-1.5, 1.5))
        cy = IMAGE_SIZE / 2 + float(rng.uniform(-6, 6))
        _draw_shape(draw, shape, cx, cy, float(rng.uniform(6.0, 8.5)), color)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def draw_scene(scene: Scene, rng: np.random.Generator) -> bytes:
    """The (static) video frame of a scene."""
    return draw_objects([(SHAPE_OF[n], COLOR_OF[n], scene.position[n]) for n in scene.visible], rng)


# -------------------------------------------------------------------------- questions
def pick(rng: np.random.Generator, items: list) -> object:
    """A uniformly random item (one rng draw)."""
    return items[int(rng.integers(len(items)))]


def _balanced_object(scene: Scene, rng: np.random.Generator) -> str:
    """A visible instrument such that P(it sounds | the frame) = 1/2.

    When all visible instruments sound (probability ``p_all``) the pick must sound;
    otherwise pick a sounding one with ``q = (1/2 - p_all) / (1 - p_all)``.
    """
    sounding = [n for n in scene.visible if n in scene.voices]
    silent = [n for n in scene.visible if n not in scene.voices]
    p_all = SOUNDING_P[len(scene.visible)][-1]
    q = (0.5 - p_all) / (1 - p_all)
    pool = sounding if not silent or rng.random() < q else silent
    return str(pick(rng, pool))


def _pair(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """Two visible instruments, at least one sounding, in random order."""
    while True:
        a, b = (str(x) for x in rng.choice(scene.visible, 2, replace=False))
        if a in scene.voices or b in scene.voices:
            return a, b


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _audio_counting(s: Scene, rng: np.random.Generator) -> list[tuple]:
    obj = str(pick(rng, sorted(s.voices)))
    return [
        ("How many musical instruments are heard throughout the video?", [], NUMBERS[len(s.voices)]),
        ("How many times does the <Object> sound?", [obj], NUMBERS[len(s.voices[obj].starts)]),
    ]


def _audio_comparative(s: Scene, rng: np.random.Generator) -> list[tuple]:
    a, b = _pair(s, rng)
    out = [("Is the <Object> louder than the <Object>?", [a, b], yes_no(s.gain(a) > s.gain(b)))]
    if a in s.voices and b in s.voices and abs(s.voices[a].span - s.voices[b].span) >= 0.5:
        out.append(
            ("Is the <Object> playing longer than the <Object>?", [a, b], yes_no(s.voices[a].span > s.voices[b].span))
        )
    return out


def _visual_counting(s: Scene, rng: np.random.Generator) -> list[tuple]:
    absent = [n for n in INSTRUMENTS if n not in s.position]
    obj = str(pick(rng, s.visible if rng.random() < 0.5 else absent))
    return [
        ("How many instruments are in the video?", [], NUMBERS[len(s.visible)]),
        ("Is there a <Object> in the entire video?", [obj], yes_no(obj in s.position)),
    ]


def _visual_location(s: Scene, rng: np.random.Generator) -> list[tuple]:
    obj = str(pick(rng, s.visible))
    side = str(pick(rng, ["leftmost", "rightmost"]))
    target = s.visible[0] if side == "leftmost" else s.visible[-1]
    return [
        ("Where is the <Object>?", [obj], s.position[obj]),
        ("What kind of instrument is the <LRer> instrument?", [side], target),
    ]


def _av_existential(s: Scene, rng: np.random.Generator) -> list[tuple]:
    obj = _balanced_object(s, rng)
    return [("Is the <Object> in the video playing?", [obj], yes_no(obj in s.voices))]


def _av_counting(s: Scene, rng: np.random.Generator) -> list[tuple]:
    return [
        ("How many instruments in the video are sounding?", [], NUMBERS[len(s.voices)]),
        (
            "How many instruments in the video did not sound from beginning to end?",
            [],
            NUMBERS[len(s.visible) - len(s.voices)],
        ),
    ]


def _av_location(s: Scene, rng: np.random.Generator) -> list[tuple]:
    loudest = max(s.voices, key=s.gain)
    out = [("Where is the loudest instrument?", [], s.position[loudest])]
    if len(s.voices) >= 2:
        out.append(("Where is the quietest sounding instrument?", [], s.position[min(s.voices, key=s.gain)]))
    return out


def _av_comparative(s: Scene, rng: np.random.Generator) -> list[tuple]:
    a, b = _pair(s, rng)
    return [
        (
            "Is the instrument on the <LR> louder than the instrument on the <LR>?",
            [s.position[a], s.position[b]],
            yes_no(s.gain(a) > s.gain(b)),
        )
    ]


def _av_temporal(s: Scene, rng: np.random.Generator) -> list[tuple]:
    order = s.by_onset
    fl = str(pick(rng, ["first", "last"]))
    who = order[0] if fl == "first" else order[-1]
    out = [
        ("Where is the <FL> sounding instrument?", [fl], s.position[who]),
        ("Which instrument makes the sound <FL>?", [fl], who),
    ]
    if len(order) >= 2:
        k = int(rng.integers(len(order)))
        out.append(("What is the <TH> instrument that comes in?", [("first", "second", "third")[k]], order[k]))
    return out


QUESTION_MAKERS = {
    ("Audio", "Counting"): _audio_counting,
    ("Audio", "Comparative"): _audio_comparative,
    ("Visual", "Counting"): _visual_counting,
    ("Visual", "Location"): _visual_location,
    ("Audio-Visual", "Existential"): _av_existential,
    ("Audio-Visual", "Counting"): _av_counting,
    ("Audio-Visual", "Location"): _av_location,
    ("Audio-Visual", "Comparative"): _av_comparative,
    ("Audio-Visual", "Temporal"): _av_temporal,
}
"""Every (scenario, type) pair of the real MUSIC-AVQA, with templates that answer it."""


def scene_questions(scene: Scene, rng: np.random.Generator, extra_p: float = 0.25) -> list[tuple]:
    """``(scenario, type, template, values, answer)``: one per pair, sometimes a second."""
    out = []
    for (scenario, qtype), maker in QUESTION_MAKERS.items():
        options = maker(scene, rng)
        order = rng.permutation(len(options))
        n = 2 if len(options) > 1 and rng.random() < extra_p else 1
        out += [(scenario, qtype, *options[i]) for i in order[:n]]
    return out
