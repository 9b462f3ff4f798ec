"""The sweep file: a base job (a ``hil train`` config or a calibration job) and axes over its
fields, validated by pydantic and expanded into cells before anything runs.

A field is a dotted path into the base (``algorithm.lr``, ``train.epochs``, ``seed``) or
``backend.NAME``, a query parameter of the backend URL (``backend.gamma``, ``backend.c2c``).
Cells are the union over ``groups`` of the grid product of the top-level and the group's
axes (a ``grid`` entry is one axis; a ``zip`` entry is one axis whose lists advance together),
times ``seeds``. Every cell's job is validated as ``hil train`` / ``hil characterize`` would
validate it, so a bad value fails here, naming the sweep file and the field, with nothing
started.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hil.config import RunConfig, parsable_url, parse_config, read_yaml, validated
from hil.errors import BackendURLError, ConfigError

Scalar = str | int | float | bool
Value = Scalar | list[Any] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrateJob(_Strict):
    """One calibration job: characterize a tile on ``backend``, then fit every device
    (the steps of ``hil characterize`` and ``hil fit``)."""

    backend: str = "sim://"
    tile: str = "cal"
    rows: int = Field(16, ge=1)
    cols: int = Field(16, ge=1)
    pulses: int = Field(400, ge=1)
    cycles: int = Field(2, ge=1)
    read_every: int = Field(1, ge=1)
    sympoint_pairs: int = Field(200, ge=0)
    noise_reads: int = Field(20, ge=0)
    criterion: Literal["bic", "aic"] = "bic"

    @field_validator("backend")
    @classmethod
    def _url(cls, v: str) -> str:
        return parsable_url(v)


class Axes(_Strict):
    """Fixed settings and axes: ``set`` fields in every cell, ``grid`` one axis per field,
    ``zip`` one axis per group of equally long lists."""

    set: dict[str, Value] = Field(default_factory=dict)
    grid: dict[str, list[Value]] = Field(default_factory=dict)
    zip: list[dict[str, list[Value]]] = Field(default_factory=list)


class Resources(_Strict):
    """What one cell asks Ray for: CPU threads (torch uses exactly these) and GPUs
    (default: 1 where the backend URL says ``device=cuda``, else 0)."""

    cpus: float = Field(1, gt=0)
    gpus: float | None = Field(None, ge=0)


class SweepFile(Axes):
    """The whole sweep file."""

    name: str | None = None
    job: Literal["train", "calibrate"] = "train"
    base: str | dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] | None = None
    groups: list[Axes] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    max_retries: int = Field(3, ge=0)

    @field_validator("base", mode="before")
    @classmethod
    def _base(cls, v: Any) -> Any:
        if not isinstance(v, (str, dict)):
            raise ValueError("give a hil train config file (path) or a mapping of settings")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(s < 0 for s in v) or len(set(v)) != len(v)):
            raise ValueError("seeds must be a non-empty list of distinct integers >= 0")
        return v


@dataclass
class Axis:
    """One axis: its fields (one, or several zipped) and the values per position."""

    fields: tuple[str, ...]
    values: list[tuple[Any, ...]]
    where: str  # its place in the sweep file, for error messages

    @property
    def label(self) -> str:
        return " / ".join(self.fields)


@dataclass
class Cell:
    """One job of the sweep: its id (also its directory name), the values of every axis it
    lies on, and the validated job config (a RunConfig or CalibrateJob as a mapping)."""

    index: int
    id: str
    values: dict[str, Any]
    config: dict[str, Any]
    gpus: float = 0.0

    @property
    def digest(self) -> str:
        """Hash of the job config: a resumed sweep checks its cells are the same jobs."""
        blob = json.dumps(self.config, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Sweep:
    """A validated, expanded sweep: everything needed to run it."""

    path: Path
    name: str
    job: str
    cells: list[Cell]
    axes: list[str]  # every field some axis sets, in file order (table columns)
    cpus: float
    max_retries: int
    axis_groups: list[tuple[str, ...]] = field(default_factory=list)  # zipped fields together


def _err(path: Path, where: str, message: str) -> ConfigError:
    return ConfigError(str(path), where, message)


def _job_model(job: str) -> type[BaseModel]:
    return RunConfig if job == "train" else CalibrateJob


def check_field(model: type[BaseModel], dotted: str) -> None:
    """Raise ValueError unless ``dotted`` names a field of ``model`` (``backend.X`` names a
    backend URL parameter)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ValueError("empty part in field name")
    if parts[0] == "backend" and len(parts) == 2 and "backend" in model.model_fields:
        return
    cur: Any = model
    for i, part in enumerate(parts):
        fields = getattr(cur, "model_fields", None)
        if fields is None or part not in fields:
            known = ", ".join(sorted(fields)) if fields else "(no sub-fields)"
            at = ".".join(parts[:i]) or "the job"
            raise ValueError(f"unknown field (fields of {at}: {known}"
                             + (", backend.PARAM" if i == 0 and "backend" in fields else "")
                             + ")")
        cur = fields[part].annotation
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            if i != len(parts) - 1:
                raise ValueError(f"{'.'.join(parts[:i + 1])} has no sub-fields")
            return


def set_url_param(url: str, name: str, value: Any) -> str:
    """``url`` with query parameter ``name`` set to ``value`` (added or replaced)."""
    head, _, query = url.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    params[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return f"{head}?{urlencode(params, safe=':/')}"


def apply(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` in the nested mapping ``config`` (``backend.X``: a URL parameter)."""
    parts = dotted.split(".")
    if parts[0] == "backend" and len(parts) == 2:
        if isinstance(value, (list, dict)) or value is None:
            raise ValueError("a backend URL parameter takes a number or a word")
        config["backend"] = set_url_param(config.get("backend", "sim://"), parts[1], value)
        return
    cur = config
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def _axes_of(block: Axes, model: type[BaseModel], path: Path, prefix: str) -> list[Axis]:
    axes: list[Axis] = []
    for name in block.set:
        _check(model, name, path, f"{prefix}set.{name}")
    for name, values in block.grid.items():
        where = f"{prefix}grid.{name}"
        _check(model, name, path, where)
        if not values:
            raise _err(path, where, "empty axis (give at least one value)")
        axes.append(Axis((name,), [(v,) for v in values], where))
    for i, group in enumerate(block.zip):
        where = f"{prefix}zip[{i}]"
        if not group:
            raise _err(path, where, "empty zip group")
        lengths = {name: len(vals) for name, vals in group.items()}
        for name, n in lengths.items():
            _check(model, name, path, f"{where}.{name}")
            if n == 0:
                raise _err(path, f"{where}.{name}", "empty axis (give at least one value)")
        if len(set(lengths.values())) != 1:
            raise _err(path, where, "zipped lists differ in length: "
                       + ", ".join(f"{k} has {n}" for k, n in lengths.items()))
        names = tuple(group)
        axes.append(Axis(names, list(zip(*(group[n] for n in names), strict=True)), where))
    return axes


def _check(model: type[BaseModel], name: str, path: Path, where: str) -> None:
    try:
        check_field(model, name)
    except ValueError as exc:
        raise _err(path, where, str(exc)) from None


def _slug(values: dict[str, Any]) -> str:
    text = "_".join(f"{k}={v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9=._+-]+", "-", text)[:80].strip("-_")


def _load_base(sf: SweepFile, path: Path) -> dict[str, Any]:
    if isinstance(sf.base, dict):
        return json.loads(json.dumps(sf.base))  # a deep copy of plain data
    base_path = (path.parent / sf.base) if not Path(sf.base).is_absolute() else Path(sf.base)
    if not base_path.is_file():
        raise _err(path, "base", f"{base_path} is not a file")
    data = read_yaml(base_path)
    if not isinstance(data, dict):
        raise _err(path, "base", f"{base_path} is not a mapping of settings")
    return data


def _validate_job(job: str, config: dict[str, Any], path: Path, cell: str) -> dict[str, Any]:
    """The cell's job validated as its command would (errors name the sweep file and cell)."""
    if job == "train":
        try:
            cfg = parse_config(config, str(path))
        except ConfigError as exc:
            raise _err(path, f"{cell}: {exc.field}", exc.message) from None
        return cfg.model_dump()
    return validated(CalibrateJob, config, str(path), f"{cell}: ").model_dump()


def _check_backend(url: str, path: Path, label: str) -> None:
    """The backend URL's parameters as its backend reads them, nothing opened; a GPU is
    checked where the cell runs (this machine may have none), so device=cuda is read as cpu."""
    from hil.backend import check_backend_url

    probe = set_url_param(url, "device", "cpu") if _wants_cuda(url) else url
    try:
        check_backend_url(probe)
    except BackendURLError as exc:
        raise _err(path, f"{label}: backend", str(exc).replace(probe, url)) from None


def _wants_cuda(url: str) -> bool:
    _, _, query = url.partition("?")
    return dict(parse_qsl(query)).get("device") == "cuda"


def parse_sweep(data: Any, path: Path) -> Sweep:
    """Validate a loaded sweep file and expand it into cells (errors: one ConfigError)."""
    path = Path(path)
    if not isinstance(data, dict):
        raise _err(path, "<top>", "expected a mapping (base, grid, zip, seeds, groups, ...)")
    sf = validated(SweepFile, data, str(path))
    model = _job_model(sf.job)
    base = _load_base(sf, path)
    top = _axes_of(sf, model, path, "")
    groups = sf.groups or [Axes()]
    axis_fields: list[str] = ["seed"] if sf.seeds else []
    axis_groups: list[tuple[str, ...]] = [("seed",)] if sf.seeds else []
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    group_axes = []
    for gi, group in enumerate(groups):
        axes = top + _axes_of(group, model, path, f"groups[{gi}]." if sf.groups else "")
        group_axes.append(axes)
        if sf.groups:
            axis_fields += [f for f in group.set if f not in axis_fields]
        for ax in axes:
            if ax.fields not in axis_groups:
                axis_groups.append(ax.fields)
            axis_fields += [f for f in ax.fields if f not in axis_fields]
    # seeds outermost: a sweep stopped part-way holds whole replicas of the grid
    seeds: list[int | None] = list(sf.seeds) if sf.seeds else [None]
    for seed in seeds:
        for group, axes in zip(groups, group_axes, strict=True):
            for combo in itertools.product(*(ax.values for ax in axes)):
                cells.append(_cell(sf, path, base, group, axes, combo, seed, len(cells), seen))
    name = sf.name or path.stem
    return Sweep(path, name, sf.job, cells, axis_fields, sf.resources.cpus, sf.max_retries,
                 axis_groups)


def _cell(sf: SweepFile, path: Path, base: dict[str, Any], group: Axes, axes: list[Axis],
          combo: tuple, seed: int | None, index: int, seen: dict[str, int]) -> Cell:
    """One cell: the base with the settings, the seed and this combination of axis values,
    validated as its job; ``seen`` catches two cells with the same job."""
    config = json.loads(json.dumps(base))
    values: dict[str, Any] = {}
    try:
        for name, v in {**sf.set, **group.set}.items():
            apply(config, name, v)
        if seed is not None:
            _apply_seed(config, seed, sf.job)
            values["seed"] = seed
        if sf.groups:  # a group's own settings label its cells in the table
            values.update(group.set)
        for ax, vals in zip(axes, combo, strict=True):
            for name, v in zip(ax.fields, vals, strict=True):
                apply(config, name, v)
                values[name] = v
    except ValueError as exc:
        raise _err(path, "set/axes", str(exc)) from None
    label = f"cell {index} ({_slug(values) or 'base'})"
    job = _validate_job(sf.job, config, path, label)
    if sf.job == "calibrate" or job["algorithm"]["name"] != "digital":
        _check_backend(job["backend"], path, label)
    key = json.dumps(job, sort_keys=True)
    if key in seen:
        raise _err(path, "axes", f"{label} repeats cell {seen[key]} (the same job twice)")
    seen[key] = index
    gpus = sf.resources.gpus if sf.resources.gpus is not None else (
        1.0 if _wants_cuda(job.get("backend", "")) else 0.0)
    cid = f"c{index:03d}" + (f"_{_slug(values)}" if values else "")
    return Cell(index, cid, values, job, gpus)


def _apply_seed(config: dict[str, Any], seed: int, job: str) -> None:
    """``seeds``: the run's ``seed`` and the backend URL's ``seed`` parameter (if it has one),
    so a seed varies the initialization, data order and the emulator's devices together."""
    if job == "train":
        config["seed"] = seed
    url = config.get("backend")
    if isinstance(url, str) and re.search(r"[?&]seed=", url):
        config["backend"] = set_url_param(url, "seed", seed)
    elif job == "calibrate":
        config["backend"] = set_url_param(url or "sim://", "seed", seed)


def load_sweep(path: str | Path) -> Sweep:
    """Read, validate and expand a sweep file (YAML)."""
    return parse_sweep(read_yaml(path), Path(path))
