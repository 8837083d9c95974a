"""A K/V layout per attention layer: a default policy and the layers that differ from it.

Text form (``VLLM_INT4KV_POLICY``, stored decisions, ``quality`` run names)::

    DEFAULT[;LAYERS:POLICY]...        k4v4-rot;0-2,8:k8v4;23:k16v16

``LAYERS`` lists layer indices and ranges (``0-2,8`` is 0, 1, 2 and 8), the indices vLLM's
``--kv-cache-dtype-skip-layers`` takes. Without a ``DEFAULT`` (every entry names its layers), every
attention layer of the model must be named: ``0-1:k8v4;2-23:k4v4``. A map with no entries is the uniform
policy, and its text is that policy's name, so every policy name is a map.

A JSON file holds the same: ``VLLM_INT4KV_POLICY=/path/map.json`` with
``{"default": "k4v4-rot", "layers": {"0-2,8": "k8v4", "23": "k16v16"}}`` (``default`` optional).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .layout import KVPolicy, parse_policy


@dataclass(frozen=True)
class PolicyMap:
    """``default`` for every layer not in ``layers`` (sorted ``(index, policy)`` pairs, each index once);
    None: every layer must be listed."""

    default: KVPolicy | None
    layers: tuple[tuple[int, KVPolicy], ...] = ()

    def __post_init__(self):
        indices = [index for index, _ in self.layers]
        if indices != sorted(set(indices)):
            raise ValueError(f"layers must be sorted and distinct, got {indices}")
        if self.default is None and not self.layers:
            raise ValueError("a map without a default policy must name its layers")
        if self.default is not None:  # a layer named with the default's own policy says nothing more
            object.__setattr__(self, "layers", tuple(p for p in self.layers if p[1] != self.default))

    @classmethod
    def uniform(cls, policy: KVPolicy) -> PolicyMap:
        return cls(policy)

    def for_layer(self, index: int) -> KVPolicy:
        for named, policy in self.layers:
            if named == index:
                return policy
        if self.default is None:
            raise ValueError(f"policy map {self.name} names no layout for layer {index}")
        return self.default

    @property
    def single(self) -> KVPolicy | None:
        """The one policy of a uniform map (no layer differs), else None."""
        return self.default if not self.layers else None

    @property
    def policies(self) -> list[KVPolicy]:
        """Every layout the map uses, default first, then in the order of their first layer."""
        found = [] if self.default is None else [self.default]
        for _, policy in self.layers:
            if policy not in found:
                found.append(policy)
        return found

    @property
    def quantized(self) -> bool:
        return any(policy.quantized for policy in self.policies)

    @property
    def rotates(self) -> bool:
        return any(policy.rotate for policy in self.policies)

    @property
    def name(self) -> str:
        entries = [] if self.default is None else [self.default.name]
        for policy in self.policies:
            if policy == self.default:
                continue
            entries.append(f"{format_layers(i for i, p in self.layers if p == policy)}:{policy.name}")
        return ";".join(entries)

    def __str__(self) -> str:
        return self.name

    def with_layers(self, indices: Iterable[int], policy: KVPolicy) -> PolicyMap:
        """This map with ``indices`` at ``policy``."""
        chosen = set(indices)
        kept = [pair for pair in self.layers if pair[0] not in chosen]
        return PolicyMap(self.default, tuple(sorted(kept + [(index, policy) for index in chosen])))

    def check_layers(self, attention_layers: Iterable[int]) -> None:
        """Raise ValueError if the map names a layer the model has no attention KV cache for, or (without a
        default) leaves one of them out."""
        present = sorted(set(attention_layers))
        unknown = [index for index, _ in self.layers if index not in present]
        problems = []
        if unknown:
            problems.append(f"layer{'s' * (len(unknown) > 1)} {format_layers(unknown)} "
                            f"{'hold' if len(unknown) > 1 else 'holds'} no attention KV cache in this model "
                            f"(its attention layers: {format_layers(present)})")
        if self.default is None:
            named = {index for index, _ in self.layers}
            missing = [index for index in present if index not in named]
            if missing:
                problems.append(f"no layout for layer{'s' * (len(missing) > 1)} {format_layers(missing)}: "
                                "name every attention layer, or start the map with a default policy "
                                "(e.g. k4v4;...)")
        if problems:
            raise ValueError(f"policy map {self.name}: " + "; ".join(problems))

    def check_head_dim(self, head_dim: int, elem_bytes: int = 2) -> None:
        """Raise ValueError if a layout of the map does not fit this head size (e.g. key groups)."""
        for policy in self.policies:
            policy.layout(head_dim, 16, elem_bytes)

    def slot_bytes(self, index: int, head_dim: int, elem_bytes: int = 2) -> int:
        return self.for_layer(index).slot_bytes(head_dim, elem_bytes)

    def mean_slot_bytes(self, attention_layers: Iterable[int], head_dim: int, elem_bytes: int = 2) -> float:
        """Bytes per token per KV head, averaged over the given layers, each at its own layout (no padding:
        see ``allocation`` for what vLLM allocates)."""
        sizes = [self.slot_bytes(index, head_dim, elem_bytes) for index in attention_layers]
        return sum(sizes) / len(sizes)


def allocated_sizes(sizes: list[int], mixed_types: bool) -> list[int]:
    """Per-layer page sizes (bytes per token) as vLLM allocates them. Layers of one type each keep their
    own size in one pool; on a model that mixes layer types (sliding-window or state layers beside full
    attention) vLLM unifies the pages: a page that divides the largest gets proportionally more tokens
    (the same bytes per token), any other is padded to the largest."""
    if not mixed_types or not sizes:
        return list(sizes)
    largest = max(sizes)
    return [size if largest % size == 0 else largest for size in sizes]


def split_policy_list(text: str) -> list[str]:
    """``"k16v16,k4v4-rot;0-2,8:k8v4"`` -> ``["k16v16", "k4v4-rot;0-2,8:k8v4"]``: commas separate names,
    except those of a map's layer lists (followed by a digit)."""
    return [part.strip() for part in re.split(r",(?!\s*\d)", text) if part.strip()]


def format_layers(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 8]`` -> ``"0-2,8"``."""
    runs: list[list[int]] = []
    for index in sorted(set(indices)):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_layers(text: str) -> list[int]:
    """``"0-2,8"`` -> ``[0, 1, 2, 8]``: plain ASCII numbers without leading zeros (as vLLM compares
    layer names), ranges low to high."""
    indices = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        bounds = [low, high] if dash else [low]
        if not all(b.isascii() and b.isdigit() and str(int(b)) == b for b in bounds):
            raise ValueError(f"layers {text!r}: give indices and ranges such as 0-2,8 (no leading zeros)")
        first, last = int(bounds[0]), int(bounds[-1])
        if last < first:
            raise ValueError(f"layers {text!r}: the range {part.strip()} runs backwards")
        indices += range(first, last + 1)
    return indices


def _from_entries(default: str | None, entries: list[tuple[str, str]], source: str) -> PolicyMap:
    named: dict[int, tuple[str, KVPolicy]] = {}
    for layers_text, policy_text in entries:
        policy = parse_policy(policy_text)
        for index in parse_layers(layers_text):
            if index in named:
                raise ValueError(f"{source}: layer {index} is named twice ({named[index][0]} and "
                                 f"{layers_text}:{policy_text})")
            named[index] = (f"{layers_text}:{policy_text}", policy)
    if default is not None and default.strip().lower() == "auto":
        raise ValueError(f"{source}: auto chooses every layer's layout itself; give a fixed default policy "
                         "such as k4v4 beside per-layer entries, or auto alone")
    return PolicyMap(None if default is None else parse_policy(default),
                     tuple(sorted((index, policy) for index, (_, policy) in named.items())))


def parse_policy_map(text: str) -> PolicyMap:
    """A policy name, a map in the text form above, or the path of a JSON map file."""
    text = text.strip()
    if text.lower().endswith(".json"):
        return load_policy_map(Path(text).expanduser())
    entries, default = [], None
    for position, entry in enumerate(part.strip() for part in text.split(";")):
        if not entry:
            raise ValueError(f"policy map {text!r}: an empty entry (two ';' in a row, or one at an end)")
        layers_text, colon, policy_text = entry.rpartition(":")
        if not colon:
            if position:
                raise ValueError(f"policy map {text!r}: only the first entry may be a default policy; "
                                 f"write {entry!r} as LAYERS:{entry}")
            default = entry
        else:
            entries.append((layers_text, policy_text))
    return _from_entries(default, entries, f"policy map {text!r}")


def load_policy_map(path: Path) -> PolicyMap:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"policy map file {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"policy map file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"default", "layers"} or not isinstance(data.get("layers", {}), dict):
        raise ValueError(f"policy map file {path}: expected {{\"default\": POLICY, \"layers\": "
                         "{\"0-2,8\": POLICY, ...}} (default optional)")
    return _from_entries(data.get("default"), [(str(k), str(v)) for k, v in data.get("layers", {}).items()],
                         f"policy map file {path}")
