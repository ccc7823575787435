"""Strict YAML loading with dotted overrides.

Every key is checked against the dataclasses in :mod:`pipeline.config.schema`: an unknown key at
any depth is an error naming the file, the dotted key and the closest valid key (DINOv2's merge
silently accepts misspellings; we refuse them). Every value is type-checked; nothing is applied
until the whole config validates.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from pipeline.config.schema import Config, ConfigError, data_path_problem, default_run_dir, redact_text
from pipeline.durable import atomic_write
from pipeline.model.presets import PRESET_NAMES, preset_kwargs

_MISSING = object()


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts (sections and leaves)."""
    keys: list[str] = []
    for name, hint in _hints(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(hint):
            keys.extend(valid_keys(hint, dotted + "."))
    return keys


def _unknown_key(dotted: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(dotted, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    section = dotted.rpartition(".")[0]
    cls = _section_class(section)
    options = ", ".join(_hints(cls)) if cls else ""
    return ConfigError(f"{source}: unknown config key '{dotted}'{hint} (valid keys here: {options})")


def _section_class(section: str) -> type | None:
    cls: Any = Config
    for part in filter(None, section.split(".")):
        hint = _hints(cls).get(part)
        if not dataclasses.is_dataclass(hint):
            return None
        cls = hint
    return cls


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, dotted: str, source: str) -> Any:
    """Check ``value`` against the annotation ``hint``; return it converted (lists -> tuples)."""
    bad = ConfigError(
        f"{source}: config key '{dotted}' expects {_type_name(hint)}, got {value!r} ({type(value).__name__})"
    )
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _coerce(value, option, dotted, source)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in get_args(hint):
            return value
        raise ConfigError(
            f"{source}: config key '{dotted}' must be one of {', '.join(repr(a) for a in get_args(hint))}, "
            f"got {value!r}"
        )
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], dotted, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: config key '{dotted}' expects {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, dotted, source) for v, a in zip(value, args, strict=True))
    if origin is dict:
        key_t, val_t = get_args(hint)
        if not isinstance(value, dict):
            raise bad
        return {_coerce(k, key_t, dotted, source): _coerce(v, val_t, f"{dotted}.{k}", source) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept any spelling float() accepts.
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    raise AssertionError(f"unsupported annotation {hint!r} on {dotted}")


def _build(cls: type, data: dict, prefix: str, source: str, origins: dict[str, str] | None = None) -> Any:
    """Construct dataclass ``cls`` from ``data`` (a nested dict), strictly.

    ``origins`` maps dotted keys set by an override to that override, so an error names the
    override rather than the file.
    """
    origins = origins or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = _hints(cls)
    for key in data:
        if key not in hints:
            raise _unknown_key(f"{prefix}{key}", source)
    kwargs = {}
    for name, hint in hints.items():
        if name not in data:
            continue
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name] or {}, f"{prefix}{name}.", source, origins)
        else:
            dotted = f"{prefix}{name}"
            kwargs[name] = _coerce(data[name], hint, dotted, origins.get(dotted, source))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _expand_preset(tree: dict, source: str) -> None:
    """Fill the architecture of ``model.preset`` where the config does not set it itself."""
    model = tree.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return
    try:
        arch = preset_kwargs(model["preset"])
    except ValueError:
        close = difflib.get_close_matches(str(model["preset"]), PRESET_NAMES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{source}: unknown model.preset {model['preset']!r}{hint} (valid: {', '.join(PRESET_NAMES)})"
        ) from None
    for key, value in arch.items():
        model.setdefault(key, value)


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    cls: Any = Config
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise _unknown_key(".".join(parts[: i + 1]), source)
        if i == len(parts) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(hints[part]):
            raise ConfigError(
                f"{source}: '{'.'.join(parts[: i + 1])}' is a value, not a section; cannot set '{dotted}'"
            )
        cls = hints[part]
        if node.get(part) is None:  # absent, or an empty section in the file (`train:`)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: config key '{'.'.join(parts[: i + 1])}' must be a mapping")


def apply_overrides(tree: dict, overrides: typing.Iterable[str]) -> dict[str, str]:
    """Apply ``a.b=value`` strings (values parsed as YAML) onto the nested dict ``tree``.

    Returns which dotted key each override set, for error messages.
    """
    origins: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e.problem})") from None
        _set_dotted(tree, key.strip(), value, f"override {item!r}")
        origins[key.strip()] = f"override {item!r}"
    return origins


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: typing.Iterable[str] = (),
    *,
    defaults: typing.Mapping[str, Any] | None = None,
    absolute_paths: bool = False,
    run_overrides: typing.Sequence[str] | None = None,
) -> Config:
    """Load ``path`` (None: the embedded defaults), apply dotted ``overrides``, validate all once.

    Every default and path is resolved on the raw tree first, so the config is built (and
    validated) once and never edited afterwards:

    - ``name`` defaults to the file's stem and ``family`` to the file's folder
      (``configs/pretrain/x.yaml`` -> family "pretrain"); what a family means for tracking is
      tracking's rule (pipeline.tracking.run_names), not the loader's;
    - ``defaults`` (dotted key -> value) fill keys that neither the file nor an override sets
      (the launcher's tracking server URL);
    - an unset ``train.run_dir`` is ``runs/<name>-<recipe overrides>`` (schema.default_run_dir) from
      ``run_overrides`` (default: ``overrides``; the launcher names runs by its dotted overrides, not
      its flags, as the ranks name their MLflow run), so two runs of another recipe never share a dir;
    - ``absolute_paths``: the run dir, data path, container and fine-tune source become absolute
      (the launcher's ranks may start in another working directory).
    """
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        tree = _read_yaml(path)
        source = str(path)
        _file_defaults(tree, path)
    overrides = list(overrides)
    origins = apply_overrides(tree, overrides)
    if overrides:
        source += f" with overrides {redact_text(' '.join(overrides))}"
    for dotted, value in (defaults or {}).items():
        if _get_dotted(tree, dotted) in (None, ""):
            _set_dotted(tree, dotted, value, "<launcher defaults>")
    if not _get_dotted(tree, "train.run_dir"):
        name = tree.get("name", Config.name)
        if isinstance(name, str):  # a wrong type is reported by the build
            run_dir = default_run_dir(name, overrides if run_overrides is None else run_overrides)
            _set_dotted(tree, "train.run_dir", run_dir, "<default run dir>")
    _expand_preset(tree, source)
    if absolute_paths:
        _absolute_paths(tree)
    return _build(Config, tree, "", source, origins)


def _file_defaults(tree: dict, path: Path) -> None:
    """The defaults a config file's place implies: its name (the stem) and family (the folder)."""
    tree.setdefault("name", path.stem)
    if path.parent.name and path.parent.name != "configs":
        tree.setdefault("family", path.parent.name)


# Paths a rank opens: absolute for the launcher (its ranks may start in another working directory).
PATH_KEYS = ("train.run_dir", "data.path", "launch.container", "finetune.init_from")


def _absolute_paths(tree: dict) -> None:
    """Make every path key absolute on the raw tree (unset keys: their default). A data.path
    validation will refuse (a URL, a pattern) stays as written, so the refusal quotes what the user
    wrote."""
    for dotted in PATH_KEYS:
        value = _get_dotted(tree, dotted)
        if value is None:
            value = _schema_default(dotted)
        if not isinstance(value, str) or not value:
            continue  # a wrong type is reported by the build
        if dotted == "data.path" and data_path_problem(value):
            continue
        _set_dotted(tree, dotted, str(Path(value).expanduser().absolute()), "<absolute paths>")


def _get_dotted(tree: dict, dotted: str) -> Any:
    """The raw value at ``dotted``, or None when it (or a section above it) is not set."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _schema_default(dotted: str) -> Any:
    section, _, key = dotted.rpartition(".")
    cls = _section_class(section)
    assert cls is not None, f"{section} is not a config section"
    return getattr(cls(), key)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Rebuild a config from :func:`config_to_dict` output (e.g. a checkpoint's copy)."""
    tree = _plain(data)
    _expand_preset(tree, source)
    return _build(Config, tree, "", source)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain YAML-able data (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write(path, dump_config(cfg))


SAVED_CONFIG = "config.yaml"  # the validated config a run's rank 0 saves in its run dir


def read_saved_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The config tree a run saved in ``run_dir`` (as written, not validated: it may come from another
    version of the code); None when there is none or it cannot be read."""
    try:
        tree = yaml.safe_load((Path(run_dir) / SAVED_CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return tree if isinstance(tree, dict) else None


def config_diff(cfg: Config) -> dict:
    """Only the values that differ from the defaults, nested (what a config file should hold); a run
    dir derived from the name and the recipe overrides (schema.default_run_dir) counts as a default."""
    base = Config()
    label, run_dir = default_run_dir(cfg.name).removeprefix("runs/"), Path(cfg.train.run_dir)
    if run_dir.parent.name == "runs" and (run_dir.name == label or run_dir.name.startswith(f"{label}-")):
        base.train.run_dir = cfg.train.run_dir
    return _diff(config_to_dict(cfg), config_to_dict(base))


def _diff(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict) and v and b[k]:
            sub = _diff(v, b[k])
            if sub:
                out[k] = sub
        elif v != b.get(k, _MISSING):
            out[k] = v
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"optim.lr": 0.001, ...}``: stable dotted names, e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict) and v and k != "tags":
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(config_to_dict(cfg), "")
    return out
