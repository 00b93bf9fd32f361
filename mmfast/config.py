"""Run configuration: typed sections, loaded from YAML (a path, or the name of a config shipped in
mmfast/configs/) with dotted ``key=value`` overrides, checked at start-up with errors that name
the key. ``hparams`` holds the method's hyper-parameters (mmfast.methods.hyper_parameters)."""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from .models.registry import FUSION_NAMES, fusion_kind, fusions_where

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
AUDIO_PRESETS = ("crema_d", "kinetics_sounds", "vggsound", "kaldi_fbank")


@dataclasses.dataclass
class DataSection:
    root: str = ""
    layout: str = "crema_d"
    backend: str = "dali"  # "dali" | "naive"
    modalities: dict | None = None  # generic layout: name -> "audio" | "video" | "frames" | "features"
    audio: str = "crema_d"  # audio recipe preset (mmfast.data.audio)
    num_frames: int = 1
    size: int = 224
    # features modalities: steps per sample (50: the word-aligned CMU-MOSEI features of the
    # multimodal Transformer's and MultiBench's public data) and the training window of a longer sequence
    feature_length: int = 50
    feature_train_offset: str = "random"  # "random" (the clip's generator; mmfast's choice) | "start"
    batch_size: int = 64
    num_workers: int = 2
    on_error: str = "raise"  # "raise" | "skip"
    allow_overlap: bool = False  # accept a clip listed in two splits
    cache: str = "off"  # decoded-sample cache (DALI backend): "off" | "auto" (the user's cache folder) | a folder
    cache_max_gb: float = 20.0  # the cache's disk budget (no published value: a size most disks spare)
    synth: dict | None = None  # generate the embedded dataset at root if absent (mmfast.data.generate options)


@dataclasses.dataclass
class ModelSection:
    encoder: str = "small"  # "small" | "resnet18"
    fusion: str = "auto"  # auto (the method's default) | concat | sum | film | gated | mlp | late | irfb | boost
    width: int = 16  # small encoder width
    irfb: dict | None = None  # IRFBEncoder options (dim, depth, heads, bottleneck_tokens, patch), used when fusion=irfb
    weights: dict | None = None  # modality -> local ResNet-18 weights file
    estimator: str = "auto"  # "auto" | "split" (concat/sum only) | "zero_out"
    mmtm: list | None = None  # encoder stages followed by an MMTM block; None: the method's (greedy: [2, 3, 4]; else none)


@dataclasses.dataclass
class OptimSection:
    name: str = "sgd"  # "sgd" | "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "step"  # "step" | "cosine" | "plateau" (x gamma when the training loss stops falling) | "none"
    step_size: int = 70  # StepLR period in epochs
    gamma: float = 0.1
    patience: int = 5  # plateau: epochs without a lower training loss before the rate falls (no published value)


@dataclasses.dataclass
class Config:
    method: str = "joint"
    hparams: dict = dataclasses.field(default_factory=dict)
    # A dataset's published recipes: method name -> config keys (hparams, optim, data, ...) that
    # apply when that method runs, over the file's values and under the command line's.
    recipes: dict = dataclasses.field(default_factory=dict)
    epochs: int = 100
    seed: int = 0
    out: str = "runs/run"
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast; fp16 with a GradScaler) | "auto" (bf16
    # where the device computes in bf16 natively, else fp32: trainer.resolve_precision)
    channels_last: bool = False
    grad_accum: int = 1
    sync_bn: bool = True  # distributed runs: batch norm over the global batch (mmfast.distributed)
    compile: bool = False  # torch.compile each encoder in place (nn.Module.compile; state dicts unchanged)
    retain_freed_memory: bool = True  # CPU runs: glibc malloc keeps freed memory for reuse (mmfast/cpu_memory.py)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: epoch ends only)
    # Distributed runs: seconds a collective waits for a stalled rank before the run stops (gloo's
    # and NCCL's default is 30 minutes). No published value: 10 minutes covers rank 0 writing a
    # checkpoint and ranks that finish probing a dataset at different times.
    dist_timeout_s: float = 600.0
    progress: bool = True  # tqdm progress bar
    data: DataSection = dataclasses.field(default_factory=DataSection)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.backend": ("dali", "naive"), "data.audio": AUDIO_PRESETS, "data.on_error": ("raise", "skip"),
    "data.feature_train_offset": ("random", "start"),
    "model.encoder": ("small", "resnet18"),
    "model.fusion": ("auto", *FUSION_NAMES),
    "model.estimator": ("auto", "split", "zero_out"), "optim.name": ("sgd", "adamw"),
    "optim.scheduler": ("step", "cosine", "plateau", "none"), "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16", "auto"),
}
POSITIVE = ("epochs", "grad_accum", "data.batch_size", "data.num_frames", "data.size", "data.feature_length",
            "model.width", "optim.step_size", "optim.patience")
NON_NEGATIVE = ("seed", "checkpoint_every", "data.num_workers", "data.cache_max_gb", "optim.lr", "optim.momentum", "optim.weight_decay",
                "optim.gamma")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(source: str | Path | dict | None = None, overrides: list[str] | tuple = (), *,
                apply_recipe: bool = True) -> Config:
    """A Config from a YAML path, a shipped config name, a dict or None (defaults), with dotted
    ``key=value`` overrides (values parsed as YAML: 2, 0.5, true, [a, b], {audio: 0.3}).
    apply_recipe=False reads a run's saved config.yaml, whose values hold the recipe already
    (applying it again would undo a user's edit of a key the recipe sets)."""
    if source is None:
        raw: dict = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.suffix and not path.exists():
            path = CONFIG_DIR / f"{source}.yaml"
            if not path.exists():
                raise ValueError(f"config {str(source)!r} is neither a YAML file nor a shipped config "
                                 f"({', '.join(shipped_configs())})")
        raw = _read_yaml(path)
    given: dict = {}  # the command line's keys
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. method=ogm_ge, data.root=DIR)")
        key, text = item.split("=", 1)
        target = given
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: empty key")
        for part in parts[:-1]:
            if not isinstance(target.setdefault(part, {}), dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            target = target[part]
        target[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    raw = _merge(raw, given)
    recipes = raw.get("recipes") or {}
    if not isinstance(recipes, dict):
        raise ValueError(f"config key 'recipes' must map method names to config keys, got {recipes!r}")
    recipe = recipes.get(raw.get("method", Config.method)) if apply_recipe else None
    if recipe is not None:
        if not isinstance(recipe, dict) or {"method", "recipes"} & set(recipe):
            raise ValueError(f"config key 'recipes.{raw.get('method')}' must be a mapping of config keys other than "
                             f"method and recipes, got {recipe!r}")
        raw = _merge(_merge(raw, recipe), given)  # (the command line stays on top)
    cfg = _build(Config, raw, "")
    check_config(cfg)
    return cfg


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"config {path} cannot be read: {err}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ValueError(f"config {path} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: the top level must be a mapping of keys")
    return raw


def _merge(base: dict, top: dict) -> dict:
    """base with top's keys over it, section by section."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ValueError(f"config key {prefix.rstrip('.')!r} must be a section (a mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; known in this section: "
                         f"{sorted(prefix + k for k in fields)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value or {}, f"{prefix}{name}.")
        elif name in ("hparams", "recipes") or name in ("synth", "modalities", "weights", "irfb"):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"config key {prefix + name!r} must be a mapping, got {value!r}")
            values[name] = dict(value) if value is not None else (None if name not in ("hparams", "recipes") else {})
        else:
            values[name] = _coerce(prefix + name, hint, value)
    return cls(**values)


def _coerce(key: str, hint, value):
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value)  # (YAML 1.1 reads 1e6 and 5E-4 as strings: a reader means the number)
        if t is str and isinstance(value, str):
            return value
        if t is list and isinstance(value, list):
            return list(value)
        if t is str and isinstance(value, bool) and key in _SWITCH_STRINGS:
            return _SWITCH_STRINGS[key][value]  # (YAML 1.1 reads off/on/no/yes as booleans)
    names = "/".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ValueError(f"config key {key!r} must be {names}, got {type(value).__name__} {value!r}")


_SWITCH_STRINGS = {"data.cache": {False: "off", True: "auto"}}
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def get(cfg: Config, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_config(cfg: Config) -> None:
    """Value checks that need no data (the method's hyper-parameters, the modalities and the
    estimator/fusion pairing are checked when the run is built)."""
    from . import methods

    for key, choices in CHOICES.items():
        if get(cfg, key) not in choices:
            raise ValueError(f"config key {key!r} must be one of {choices}, got {get(cfg, key)!r}")
    for key in POSITIVE:
        if get(cfg, key) < 1:
            raise ValueError(f"config key {key!r} must be >= 1, got {get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ValueError(f"config key {key!r} must be >= 0, got {get(cfg, key)!r}")
    for key, value in _float_keys(cfg):
        if not math.isfinite(value):
            raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
    if not cfg.dist_timeout_s > 0:
        raise ValueError(f"config key 'dist_timeout_s' must be > 0 seconds, got {cfg.dist_timeout_s!r}")
    if cfg.method not in methods.NAMES:
        raise ValueError(f"config key 'method' must be one of {methods.NAMES}, got {cfg.method!r}")
    try:
        methods.create(cfg.method, **cfg.hparams)
    except ValueError as err:
        raise ValueError(f"config key 'hparams': {err}") from None
    fusion = resolved_fusion(cfg)
    if fusion not in methods.fusions(cfg.method):
        raise ValueError(f"config key 'model.fusion': method {cfg.method!r} works with fusion "
                         f"{' or '.join(methods.fusions(cfg.method))}, got {fusion!r}")
    if cfg.model.estimator == "split" and not fusion_kind(fusion).splittable:
        raise ValueError(f"config key 'model.estimator': 'split' needs a fusion of one linear layer "
                         f"({' or '.join(fusions_where(splittable=True))}; fusion {fusion!r} cannot be split by "
                         f"modality; use estimator=zero_out or auto)")
    mmtm = resolved_mmtm(cfg)
    if mmtm and not fusion_kind(fusion).pooled:
        raise ValueError(f"config key 'model.mmtm': MMTM blocks sit between pooled encoders; fusion {fusion!r} has "
                         f"encoders of its own")
    if mmtm and cfg.compile:
        raise ValueError("config key 'compile': the encoders of a model with MMTM blocks run stage by stage, not "
                         "through the compiled forward; set compile=false or model.mmtm=[]")
    if methods.mmtm_stages(cfg.method) and not mmtm:
        raise ValueError(f"config key 'model.mmtm': method {cfg.method!r} needs MMTM blocks between the encoders "
                         f"(its default: {list(methods.mmtm_stages(cfg.method))})")
    if cfg.model.estimator == "zero_out" and fusion_kind(fusion).trains_unimodal:
        raise ValueError(f"config key 'model.estimator': fusion {fusion!r} has a classifier per modality; "
                         f"use estimator=auto")
    for name, recipe in cfg.recipes.items():
        if name not in methods.NAMES:
            raise ValueError(f"config key 'recipes': {name!r} is not a method ({', '.join(methods.NAMES)})")
    if not isinstance(cfg.data.cache, str) or not cfg.data.cache:
        raise ValueError(f"config key 'data.cache' must be off, auto or a folder, got {cfg.data.cache!r}")
    if cfg.data.backend == "naive" and cfg.data.cache not in ("off", "auto"):
        raise ValueError(f"config key 'data.cache' names a folder ({cfg.data.cache!r}), but the naive loader decodes "
                         f"every epoch (it is the research code's way): use data.backend=dali or data.cache=off")
    if not cfg.data.root:
        raise ValueError("config key 'data.root' is empty: set the dataset folder, e.g. data.root=data/cremad")


def _float_keys(section, prefix: str = ""):
    """(dotted key, value) of every float field."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_keys(value, f"{prefix}{f.name}.")
        elif hints[f.name] is float:
            yield f"{prefix}{f.name}", value


def resolved_mmtm(cfg: Config) -> tuple[int, ...]:
    """model.mmtm's stages, with None resolved to the method's (Method.mmtm_stages)."""
    from . import methods
    from .models.mmtm import check_stages

    if cfg.model.mmtm is None:
        return methods.mmtm_stages(cfg.method)
    try:
        return check_stages(cfg.model.mmtm)
    except ValueError as err:
        raise ValueError(f"config key 'model.mmtm': {err}") from None


def resolved_fusion(cfg: Config) -> str:
    """model.fusion, with "auto" resolved to the method's default (concat; late for olm; boost)."""
    from . import methods

    return methods.fusions(cfg.method)[0] if cfg.model.fusion == "auto" else cfg.model.fusion


def dump_config(cfg: Config, path: Path) -> None:
    """cfg as YAML at path, written atomically (mmfast.run_dir)."""
    from .run_dir import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# What each key means (the configuration reference, docs/config.md, is generated from this and
# the dataclasses: reference_markdown refuses a key without an entry here).
KEY_HELP = {
    "method": "The balancing method: a name in `mmfast.methods.NAMES` (the Methods pages).",
    "hparams": "The method's hyper-parameters, e.g. `hparams.alpha=0.8` (each method's page lists them, with "
               "their sources).",
    "recipes": "A dataset's published recipes: method name -> config keys (hparams, optim, data, ...) applied when "
               "that method runs, over the file's values and under the command line's.",
    "epochs": "Training epochs. A resume may raise it.",
    "seed": "Seeds Python, NumPy and torch, the data plan (clip order, augmentations) and the methods' generators.",
    "out": "The run directory (config, checkpoints, metrics, summary). A resume uses the directory given instead.",
    "device": "Where the run computes: `auto` is CUDA when a GPU is visible, else the CPU.",
    "precision": "Autocast dtype: `fp16` adds a GradScaler (gradients unscaled before modulation); `auto` is "
                 "bf16 where the device computes in bf16 natively (AVX512-BF16 or AMX CPUs, GPUs of compute "
                 "capability 8.0 or later), else fp32.",
    "channels_last": "Convolution inputs and weights in channels-last memory format.",
    "grad_accum": "Micro-batches per optimizer step (the methods measure over the whole step).",
    "sync_bn": "Distributed runs: batch norm over the global batch.",
    "compile": "torch.compile each encoder in place (state dicts unchanged).",
    "retain_freed_memory": "CPU runs: glibc malloc keeps freed memory for reuse, so each step's large buffers are "
                           "not page-faulted in again (process-wide).",
    "checkpoint_every": "Optimizer steps between mid-epoch checkpoints; 0 writes them at epoch ends only.",
    "dist_timeout_s": "Distributed runs: seconds a collective waits for a stalled rank before the run stops (gloo's "
                      "and NCCL's own default is 30 minutes; no published value).",
    "progress": "A tqdm progress bar on a terminal (elsewhere one line per epoch).",
    "data.root": "The dataset folder.",
    "data.layout": "How the dataset is stored: crema_d, kinetics_sounds, vggsound, ave or generic.",
    "data.backend": "The loader: DALI pipelines or the naive PyTorch reference loader.",
    "data.modalities": "Generic layout only: modality name -> kind (audio, video, frames or features: pre-extracted "
                       "feature sequences, one `.npy` array [steps, dims] per clip).",
    "data.audio": "The audio recipe preset (sample rate, window, hop, spectrogram shape).",
    "data.num_frames": "Video frames per clip.",
    "data.size": "Frame side in pixels after the crop.",
    "data.feature_length": "Features modalities: the steps L of every sample; a shorter sequence is padded with zeros "
                           "(its mask, batch key `<modality>_mask`, says which steps are real), a longer one cut to a "
                           "window of L steps. 50: the word-aligned CMU-MOSEI features of the multimodal "
                           "Transformer's and MultiBench's public data.",
    "data.feature_train_offset": "Features modalities: where a training window of a sequence longer than L starts: "
                                 "`random` (drawn from the clip's per-sample generator, as the audio window) or "
                                 "`start`; evaluation always takes the first L steps.",
    "data.batch_size": "The global batch (split across the ranks of a distributed run).",
    "data.num_workers": "Decoding threads (DALI) or worker processes (naive loader).",
    "data.on_error": "A clip that cannot be read: `raise` stops, `skip` leaves it out and counts it.",
    "data.allow_overlap": "Accept a clip listed in two splits.",
    "data.cache": "The decoded-sample cache (DALI backend): `off`, `auto` (`$MMFAST_CACHE_DIR`, else the user's "
                  "cache folder, `~/.cache/mmfast/decoded`) or a folder. Each clip's deterministic decoding is "
                  "written once and read every later epoch; the samples are the same as without it.",
    "data.cache_max_gb": "The cache's disk budget in GB; clips beyond it are decoded every epoch (no published value).",
    "data.synth": "Generate the embedded dataset at `data.root` when absent, with these options "
                  "(`mmfast.data.generate`).",
    "model.encoder": "The encoders: a CPU-scale CNN or ResNet-18.",
    "model.fusion": "The fusion head; `auto` is the method's default (concat; late for olm; boost for boost).",
    "model.width": "Width of the small encoder, and of the features modalities' sequence encoder (features of "
                   "4 x width values).",
    "model.irfb": "IRFB encoder options (dim, depth, heads, bottleneck_tokens, patch), for fusion irfb.",
    "model.weights": "modality -> a local ResNet-18 weights file.",
    "model.mmtm": "Encoder stages (1 to 4) each followed by an MMTM block exchanging the modalities' channel gates "
                  "(`[]`: independent encoders); unset: the method's (`greedy`: `[2, 3, 4]`, the official "
                  "placement; every other method: none).",
    "model.estimator": "How uni-modal logits are estimated: `auto` (the head's own), `split` (the fused linear's "
                       "weight split; concat and sum) or `zero_out` (the head run with the other modalities zeroed).",
    "optim.name": "The optimizer.",
    "optim.lr": "Learning rate.",
    "optim.momentum": "SGD momentum.",
    "optim.weight_decay": "Weight decay.",
    "optim.scheduler": "Learning-rate schedule: StepLR, cosine over `epochs`, x gamma when the training loss stops "
                       "falling (`plateau`), or none.",
    "optim.step_size": "StepLR period in epochs.",
    "optim.gamma": "StepLR and plateau factor.",
    "optim.patience": "Plateau: epochs without a lower training loss before the rate falls (no published value).",
}


def reference_markdown() -> str:
    """The configuration reference (docs/config.md): every key with its type, default, allowed
    values and meaning, read from the dataclasses and KEY_HELP, so the page cannot drift."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            key, hint = prefix + f.name, hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, key + ".")
                continue
            if key not in KEY_HELP:
                raise KeyError(f"config key {key!r} has no entry in mmfast.config.KEY_HELP")
            type_name = " or ".join(getattr(t, "__name__", str(t)) for t in (typing.get_args(hint) or (hint,)))
            meaning = KEY_HELP[key]
            if key in CHOICES:
                meaning += f" One of {', '.join(f'`{c}`' for c in CHOICES[key])}."
            if key in POSITIVE:
                meaning += " At least 1."
            elif key in NON_NEGATIVE:
                meaning += " At least 0."
            if hint is float:
                meaning += " Finite."
            rows.append(f"| `{key}` | {type_name.replace('NoneType', 'None')} | `{getattr(defaults, f.name)!r}` | "
                        f"{meaning.replace('|', '/')} |")

    walk(Config, "")
    unknown = set(KEY_HELP) - {r.split("`")[1] for r in rows[2:]}
    if unknown:
        raise KeyError(f"mmfast.config.KEY_HELP documents keys that do not exist: {sorted(unknown)}")
    return "\n".join(rows) + "\n"
