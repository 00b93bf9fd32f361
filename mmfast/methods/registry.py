"""The registry: method names, their classes and typed hyper-parameters."""
from __future__ import annotations

import dataclasses
from typing import Any

from .base import Method, merge_balance_params
from .agm import AGM
from .amco import AMCo
from .boost import Boost
from .cml import CML
from .feature_dropping import OPM, ModDrop
from .gblending import GBlending
from .greedy import Greedy
from .joint import Joint
from .lfm import LFM
from .mbsd import MBSD
from .mla import MLA
from .mmcosine import MMCosine
from .mmpareto import MMPareto
from .mslr import MSLR
from .ogm import OGM, OGMGE, OGMStar
from .olm import OLM
from .pmr import PMR
from .reconboost import ReconBoost
from .relearning import ReLearning
from .resample import Resample
from .umt import UMT
from .unimodal import Unimodal

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Joint, Unimodal, OGM, OGMGE, OGMStar, OPM, ModDrop, OLM,
                                                              Boost, MMCosine, MBSD, CML, PMR, AGM, MMPareto, MLA, ReconBoost,
                                                              MSLR, GBlending, ReLearning, LFM, AMCo, Greedy, UMT,
                                                              Resample)}
# Names standing for several methods at once; a hyper-parameter goes to every part that has it.
COMBINATIONS: dict[str, tuple[str, ...]] = {"opm_ogm": ("opm", "ogm_ge")}
NAMES = tuple(METHODS) + tuple(COMBINATIONS)


def register(cls: type[Method]) -> type[Method]:
    """Make a Method subclass available by its ``name`` everywhere a method name is accepted
    (configs, ``create``, ``Balancer``); usable as a class decorator. Refuses a name already taken
    and a class without a name or a dataclass ``Params``."""
    global NAMES
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register: expected a subclass of mmfast.methods.Method, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise ValueError(f"register: {cls.__name__}.name must be an identifier, got {cls.name!r}")
    if cls.name in METHODS or cls.name in COMBINATIONS:
        raise ValueError(f"register: the method name {cls.name!r} is taken (by {METHODS.get(cls.name, 'a combination')})")
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"register: {cls.__name__}.Params must be a dataclass of its hyper-parameters")
    METHODS[cls.name] = cls
    NAMES = tuple(METHODS) + tuple(COMBINATIONS)
    import mmfast.methods as package  # (its NAMES is what configs check names against)

    package.NAMES = NAMES
    return cls


def hyper_parameters(name: str) -> dict[str, Any]:
    """The hyper-parameters of a method name with their defaults."""
    parts = COMBINATIONS.get(name, (name,))
    if any(p not in METHODS for p in parts):
        raise ValueError(f"unknown method {name!r}; known: {NAMES}")
    out = {}
    for part in parts:
        for f in dataclasses.fields(METHODS[part].Params):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out.setdefault(f.name, default)
    return out


def create(name: str, **hparams) -> list[Method]:
    """The method objects `name` stands for, built from keyword hyper-parameters (errors name
    the method and the key)."""
    if name not in NAMES:
        raise ValueError(f"unknown method {name!r}; known: {NAMES}")
    parts = COMBINATIONS.get(name, (name,))
    known = hyper_parameters(name)
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ValueError(f"method {name!r}: unknown hyper-parameter(s) {unknown}; known: {sorted(known)}")
    methods = []
    for part in parts:
        fields = {f.name for f in dataclasses.fields(METHODS[part].Params)}
        methods.append(METHODS[part](**{k: v for k, v in hparams.items() if k in fields}))
    merge_balance_params(methods)  # conflicts are configuration errors, found now
    return methods


def check_modalities(name: str, modalities) -> None:
    """Refuses modalities beyond what a method of `name` is defined for (Method.max_modalities),
    saying so before any model is built."""
    for part in COMBINATIONS.get(name, (name,)):
        most = METHODS[part].max_modalities
        if most is not None and len(modalities) > most:
            raise ValueError(f"method {part!r} is defined for {most} modalities, got {len(modalities)} "
                             f"({', '.join(modalities)}); train on {most} of them (data.modalities) or choose a "
                             f"method for any number")


def mmtm_stages(name: str) -> tuple[int, ...]:
    """The encoder stages followed by MMTM blocks that the methods `name` stands for need by
    default (Method.mmtm_stages; empty: none)."""
    stages = {s for p in COMBINATIONS.get(name, (name,)) for s in METHODS[p].mmtm_stages}
    return tuple(sorted(stages))


def fusions(name: str) -> tuple[str, ...]:
    """The model fusions every method `name` stands for works with; the first is the default."""
    parts = [METHODS[p] for p in COMBINATIONS.get(name, (name,))]
    return tuple(f for f in parts[0].fusions if all(f in p.fusions for p in parts))
