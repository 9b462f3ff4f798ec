"""Training-run configuration: YAML read safely (a duplicated key is an error), validated
by strict pydantic models (no NaN or inf, no bool where a number belongs).

A bad file raises ConfigError naming the file and the first offending field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hil.errors import BackendURLError, ConfigError
from hil.url import BackendURL

AlgorithmName = Literal["digital", "analog_sgd", "tiki_taka", "residual", "rlv2", "ttv2",
                        "chopped_ttv2", "agad", "mixed_precision"]


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (plain safe_load
    keeps the last one silently, so a pasted second ``lr:`` would win unseen)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:  # as written (before '<<' merges, which may override)
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first on line {first})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML like yaml.safe_load, but a key given twice in a mapping is an error."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: Any, path: str, prefix: str = "") -> M:
    """``model.model_validate(data)``; the first failure is one ConfigError naming ``path``
    and the field (after ``prefix``, e.g. a sweep cell's label)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "<top>"
        raise ConfigError(path, prefix + field, err["msg"]) from None


def parsable_url(url: str) -> str:
    """A config field's backend URL, checked to parse (its error becomes the field's)."""
    try:
        BackendURL.parse(url)
    except BackendURLError as exc:
        raise ValueError(str(exc)) from None
    return url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


PAPER_CNN = {"channels": [16, 32], "kernel_size": 5, "pool": 2}  # the cnn's defaults


class ModelConfig(_Strict):
    """The network. ``fcn``: fully connected layers of ``hidden`` widths on the flat inputs.
    ``cnn`` (images only): per entry of ``channels`` a conv (``kernel_size`` square, no
    padding), the activation and a ``pool`` x ``pool`` max-pool, then the ``hidden`` fully
    connected layers (the paper's MNIST CNN: channels [16, 32], kernel 5, pool 2, the
    defaults, with hidden [128] and tanh). Every layer, conv or linear, lives on the
    backend's tiles. The cnn fields stay None for an fcn (setting one there is an error)."""

    kind: Literal["fcn", "cnn"] = "fcn"
    hidden: list[int] = Field(default_factory=lambda: [256, 128])
    activation: Literal["sigmoid", "tanh", "relu"] = "sigmoid"
    channels: list[int] | None = None  # cnn only
    kernel_size: int | None = Field(None, ge=1)  # cnn only
    pool: int | None = Field(None, ge=1)  # cnn only

    @field_validator("hidden", "channels")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(h < 1 for h in v):
            raise ValueError("widths must be >= 1")
        return v

    @model_validator(mode="after")
    def _cnn_fields(self) -> ModelConfig:
        for name, default in PAPER_CNN.items():
            if self.kind == "fcn" and getattr(self, name) is not None:
                raise ValueError(f"{name} applies to kind: cnn only")
            if self.kind == "cnn" and getattr(self, name) is None:
                setattr(self, name, default)
        if self.kind == "cnn" and not self.channels:
            raise ValueError("channels: a cnn needs at least one conv layer")
        return self

    def feature_side(self, side: int) -> list[int]:
        """The cnn's image side after each conv + pool stage, starting from ``side``."""
        sides = []
        for _ in self.channels or ():
            side = max(side - (self.kernel_size or 1) + 1, 0) // (self.pool or 1)
            sides.append(side)
        return sides


class DataConfig(_Strict):
    """Which data set: sklearn digits, MNIST IDX files in ``path``, or least squares."""

    name: Literal["digits", "mnist", "least_squares"] = "digits"
    path: str | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1)
    limit_train: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=1)  # images resized (bilinear) to this side
    n_inputs: int = Field(16, ge=1)  # least squares only
    n_outputs: int = Field(4, ge=1)  # least squares only


class AlgorithmConfig(_Strict):
    """The training algorithm and its rates (PAPER.md names: lr = alpha, transfer_lr = beta)."""

    name: AlgorithmName = "rlv2"
    lr: float = Field(0.05, gt=0)
    transfer_lr: float = Field(0.05, gt=0, le=1)
    gamma: float = Field(0.1, ge=0)
    transfer_every: int = Field(1, ge=1)
    transfer: Literal["full", "column"] = "full"
    columns_per_transfer: int | None = Field(None, ge=1)  # transfer: column; unset: 1
    # what transfer_every counts: steps, or samples (P updated sample by sample, each
    # followed by its transfer: aihwkit's units_in_mbatch=False); unset: step
    transfer_unit: Literal["step", "sample"] | None = None
    transfer_read: Literal["exact", "mvm"] = "exact"  # 'mvm': one-hot MVMs (aihwkit's form)
    transfer_write: Literal["counts", "pulse_train"] = "counts"  # tiki_taka / residual
    mvm_read: Literal["tiles", "summed"] = "tiles"  # 'summed': W + gamma P read as one array
    update: Literal["auto", "outer", "pulse"] = "auto"
    io: Literal["auto", "analog", "digital"] = "auto"
    zero_shift: bool = False
    max_pulses: int | None = Field(None, ge=1)
    digital_lr: float | None = Field(None, gt=0)  # biases; default: lr
    # options of some algorithms only (hil.algorithms.OPTIONS; unset: the algorithm's
    # default; docs/aihwkit.md maps them to aihwkit's names)
    buffer_granularity: float | None = Field(None, gt=0)  # threshold, in dw_min
    max_steps: int | None = Field(None, ge=1)  # pulses a device per threshold transfer
    forget_buffer: bool | None = None  # H reset (x momentum) after it fires
    momentum: float | None = Field(None, ge=0, le=1)
    buffer_cap: float | None = Field(None, ge=0)  # |H| <= cap x max_steps thresholds
    in_chop_prob: float | None = Field(None, ge=0, le=1)
    in_chop_random: bool | None = None
    out_chop_prob: float | None = Field(None, ge=0, le=1)
    tail_weightening: float | None = Field(None, gt=0)
    granularity: float | None = Field(None, gt=0)  # mixed precision; default dw_min
    n_rows_per_transfer: int | None = Field(None, ge=1)  # default: all rows
    random_row: bool | None = None
    n_x_bins: int | None = Field(None, ge=0)
    n_d_bins: int | None = Field(None, ge=0)
    stoc_round_x: bool | None = None
    stoc_round_d: bool | None = None

    @field_validator("n_x_bins", "n_d_bins")
    @classmethod
    def _bins(cls, v: int | None) -> int | None:
        if v == 1:
            raise ValueError("must be 0 (no quantization) or >= 2")
        return v

    @model_validator(mode="after")
    def _mixed_precision_default(self) -> AlgorithmConfig:
        if self.name == "mixed_precision" and "transfer_lr" not in self.model_fields_set:
            self.transfer_lr = 1.0  # whole pulses as they are (aihwkit's default)
        return self

    def options(self) -> dict[str, Any]:
        """The algorithm-specific options that are set (for make_algorithm)."""
        from hil.algorithms.options import OPTIONS

        return {key: getattr(self, key) for key in OPTIONS if getattr(self, key) is not None}


class TrainConfig(_Strict):
    """Epochs, batch size, the step learning-rate schedule and checkpointing."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(10, ge=1)
    lr_decay: float = Field(0.5, gt=0, le=1)
    decay_every: int | None = Field(None, ge=1)  # epochs; default: halfway
    checkpoint_every: int | None = Field(None, ge=1)  # steps; always at each epoch end

    @property
    def decay_period(self) -> int:
        return self.decay_every or max(1, self.epochs // 2)


class RunConfig(_Strict):
    """One training run."""

    name: str = "run"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    backend: str = "sim://"
    out_dir: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("backend")
    @classmethod
    def _url(cls, v: str) -> str:
        return parsable_url(v)


def parse_config(data: Any, path: str = "<config>") -> RunConfig:
    """Validate a loaded mapping; a failure is one ConfigError naming ``path`` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(path, "<top>", "expected a mapping of settings")
    cfg = validated(RunConfig, data, path)
    if cfg.data.image_size is not None and cfg.data.name not in IMAGE_SIDE:
        raise ConfigError(path, "data.image_size", f"{cfg.data.name} holds no images")
    if cfg.model.kind == "cnn":
        _check_cnn(cfg, path)
    from hil.algorithms.options import OPTIONS

    if (cfg.algorithm.columns_per_transfer or 1) != 1 and cfg.algorithm.transfer != "column":
        raise ConfigError(path, "algorithm.columns_per_transfer",
                          "applies to transfer: column only")
    for key, names in OPTIONS.items():
        if getattr(cfg.algorithm, key) is not None and cfg.algorithm.name not in names:
            raise ConfigError(path, f"algorithm.{key}",
                              f"applies to {', '.join(names)}, not {cfg.algorithm.name}")
    if cfg.data.name == "mnist":
        if not cfg.data.path:
            raise ConfigError(path, "data.path", "mnist needs the directory of the IDX files")
        if not Path(cfg.data.path).is_dir():
            raise ConfigError(path, "data.path", f"{cfg.data.path} is not a directory")
    return cfg


IMAGE_SIDE = {"digits": 8, "mnist": 28}  # the data sets of images, and their native side


def _check_cnn(cfg: RunConfig, path: str) -> None:
    """A cnn needs images large enough that every conv + pool stage keeps a pixel."""
    if cfg.data.name not in IMAGE_SIDE:
        raise ConfigError(path, "model.kind", f"cnn needs images (digits or mnist), not "
                          f"{cfg.data.name}")
    side = cfg.data.image_size or IMAGE_SIDE[cfg.data.name]
    sides = cfg.model.feature_side(side)
    if sides[-1] < 1:
        stage = next(i for i, s in enumerate(sides) if s < 1) + 1
        raise ConfigError(path, "model.channels", f"a {side}x{side} image has no pixel left "
                          f"after conv + pool stage {stage} (kernel {cfg.model.kernel_size}, "
                          f"pool {cfg.model.pool}); set data.image_size (e.g. 28)")


def read_yaml(path: str | Path) -> Any:
    """yaml.safe_load of a file; an unreadable file or bad YAML is one ConfigError naming
    the file and the line."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), "<file>", getattr(exc, "strerror", None) or str(exc)
                          ) from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<yaml>"
        raise ConfigError(str(p), where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run configuration."""
    return parse_config(read_yaml(path), str(path))
