"""A deployable packed mixed-precision model file, its loader and its sizes.

A training checkpoint holds 16 float planes per 8-bit weight; this module
writes the small model itself: every quantized tensor bit-packed at its own
precision, the float parts as float32, and a JSON header that says how to
rebuild the Flax model. Reading a file needs numpy alone (`read_packed`);
`load_model` also rebuilds the network with `bsq_jax.models.build_model`.

What is stored is exactly what the trained network used (spec section 2):
for a tensor of precision n >= 1 the signed integer level

    q = sign(x) * round(|x| * K(n)),  x = clip(c, -1, 1),  K(n) = 2**n - 1,

where c is the unscaled weight of the BSQ planes (bsq mode) or the finetuned
`Levels.c` (finetune mode), together with the float32 scale s, so that the
weight is  w = s * q / K(n).  `load_model` feeds q back through the very
`bitplanes.quantize_ste` code the network trained with, so the rebuilt model's
weights and logits equal the trained network's bit for bit.

File format, version 1
======================

All integers are little-endian. Offsets are in bytes.

    offset  size  field
    0       8     magic: the bytes  B S Q P A C K \\x00  (b"BSQPACK\\x00")
    8       4     uint32 format version (1)
    12      4     uint32 H: length of the JSON header in bytes
    16      4     uint32 CRC-32 (zlib.crc32) of the H header bytes
    20      H     header: UTF-8 JSON object (below)
    20+H    P     payload: the tensors' bytes, back to back, no padding

The file is exactly 20 + H + P bytes long; anything else is a truncated or
damaged file. A reader checks the magic and the version first (a later
version may change everything after byte 12), then the header CRC, then the
payload's length and SHA-256.

The header object has these keys:

- ``magic``: "BSQPACK"; ``format_version``: 1 (both repeat the prefix).
- ``model_config``: the model config dict `build_model` takes.
- ``mode``: the mode the network was trained in, "bsq" or "finetune" (for
  information: both are stored the same way).
- ``scheme``: {tensor path: precision} for every quantized tensor, in
  network order.
- ``payload_bytes``: P.  ``payload_sha256``: hex SHA-256 of the payload.
- ``accounting``: {total_params, total_bits, average_bits, compression}, the
  paper's numbers (spec section 9), for information.
- ``tensors``: a list, in payload order (the network's order: the order in
  which the model creates its variables, "params" first), of objects
  {collection, path, kind, shape, bits, offset, length}: ``collection`` is
  the Flax variable collection ("params", "batch_stats"), ``path`` the
  "/"-joined path inside it ("layer1_0/conv1/kernel"), ``offset`` counts from
  the start of the payload, ``length`` is the tensor's byte count.

A tensor of ``kind`` "float32" (BatchNorm scale/bias/mean/var, unquantized
1x1 shortcut convolutions, PACT alphas) is prod(shape) little-endian IEEE
float32 values in C order; ``bits`` is 32; length = 4 * prod(shape).

A tensor of ``kind`` "quantized" at precision n = ``bits`` with m =
prod(shape) weights is

    4 bytes        its scale s, little-endian float32
    ceil(m*(n+1)/8) bytes  the packed weights

The packed weights are a bit stream, most significant bit of each byte first
(``np.packbits(..., bitorder="big")``), zero-padded to a whole byte. Weight i
(C order over ``shape``) takes bits i*(n+1) .. i*(n+1)+n of the stream: first
its sign bit (1 = negative), then its magnitude |q| in n bits, most
significant first, so |q| <= K(n) = 2**n - 1 and q = +-|q| takes the 2**(n+1)-1
levels of BSQ's n-bit weight. (The sign bit of a zero magnitude records the
sign of the float zero the network computed, -0.0 or 0.0; a reader may ignore
it.) A tensor of precision 0 is all zero: it has its 4 scale bytes and no
weight bits (length 4). The weight is w = s * q / K(n) (float32: XLA
evaluates q * float32(1/K(n)), then times s; inside a fused computation it
may reassociate, so a numpy reader agrees to within an ulp and `load_model` is
the bit-exact route); precision 0 gives w = 0 * s.

Sizes. The paper counts n bits per weight (compression = 32 TP / TB). The file
needs n+1 bits per weight (the sign), the scales, the float parts and the
header:

    file bytes = 20 + H + sum_q (4 + ceil(m_q (n_q + 1) / 8)) + 4 F

with F the number of float32 values; `formula_bytes` gives all but H.
`ExportStats` reports both ratios.

Errors: a missing, truncated, corrupt (CRC / SHA-256 mismatch), wrong-magic
or wrong-version file raises `ExportError` (a ValueError) with a one-line
message naming the file and what was expected.

API: `export_model` -> `ExportStats`; `read_packed` -> `PackedModel` (numpy
only); `load_model` -> (Flax model, variables); `formula_bytes`.

CLI:  python -m bsq_jax.export --workdir DIR [--stage finetune|bsq] --out FILE
(the run is read with `bsq_jax.checkpoint.load_result`; the stage defaults to
the last finished of finetune, bsq).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import struct
import sys
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

MAGIC = b"BSQPACK\x00"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sIII")  # magic, version, header length, header crc32
PREFIX_BYTES = PREFIX.size  # 20
SCALE_BYTES = 4
EXPORT_MODES = ("bsq", "finetune")


class ExportError(ValueError):
  """A packed model file cannot be written or read (one-line message)."""


def _steps(n: int) -> int:
  return 2**n - 1


def packed_bytes(size: int, bits: int) -> int:
  """Bytes of one quantized tensor's packed weights: ceil(m (n+1) / 8)."""
  return 0 if bits == 0 else -(-size * (bits + 1) // 8)


def formula_bytes(bits: Mapping[str, int], sizes: Mapping[str, int],
                  float_elements: int) -> int:
  """The file's size less its JSON header (spec of the format above):

  20 + sum_q (4 + ceil(m_q (n_q + 1) / 8)) + 4 * float_elements.
  """
  return (PREFIX_BYTES +
          sum(SCALE_BYTES + packed_bytes(sizes[k], bits[k]) for k in sizes) +
          4 * float_elements)


# --------------------------------------------------------------------------
# Integer levels of a trained tensor (shared with bsq_jax.inspect_model).


@dataclasses.dataclass(frozen=True)
class PackedTensor:
  """One quantized tensor as integers: w = scale * q / K(bits)."""
  path: str              # "layer1_0/conv1/kernel" (its scheme name)
  shape: Tuple[int, ...]
  bits: int
  scale: np.float32
  sign: np.ndarray       # bool, shape; True = negative (incl. -0.0)
  magnitude: np.ndarray  # uint16, shape; |q| in [0, K(bits)]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def q(self) -> np.ndarray:
    """Signed integer levels in [-K(n), K(n)] (int32)."""
    m = self.magnitude.astype(np.int32)
    return np.where(self.sign, -m, m)

  def unscaled(self) -> np.ndarray:
    """c = q / K(n) as float32 (with the sign of zero kept): Levels.c."""
    if self.bits == 0:
      return np.zeros(self.shape, np.float32)
    m = self.magnitude.astype(np.float32)
    return np.where(self.sign, -m, m) / np.float32(_steps(self.bits))

  def weight(self) -> np.ndarray:
    """w = s * q / K(n) with numpy, as XLA evaluates it (q * f32(1/K), * s).

    Equal to the trained network's weight up to XLA's freedom to reassociate
    inside a fused computation (at most an ulp); `load_model` is bit-exact.
    """
    if self.bits == 0:
      return np.zeros(self.shape, np.float32) * self.scale
    m = self.magnitude.astype(np.float32)
    q = np.where(self.sign, -m, m)
    return self.scale * (q * (np.float32(1) / np.float32(_steps(self.bits))))

  def density(self) -> np.ndarray:
    """Fraction of weights with bit plane b set, b = 0 (MSB) .. bits-1."""
    shifts = np.arange(self.bits - 1, -1, -1)
    mag = self.magnitude.reshape(-1).astype(np.int64)
    if mag.size == 0:
      return np.zeros(self.bits)
    return ((mag[:, None] >> shifts) & 1).mean(axis=0)


@functools.lru_cache(maxsize=None)
def _levels_fn():
  """One jitted Q_n(clip(c)) over all tensors: the same code as bp.weight
  (BitPlanes) and bp.level_weight (Levels), without the scale."""
  import jax
  from bsq_jax import bitplanes as bp

  def levels(nodes, bits):
    return [bp.quantize_ste(bp.unscaled(v) if isinstance(v, bp.BitPlanes)
                            else v.c, n) for v, n in zip(nodes, bits)]
  return jax.jit(levels, static_argnums=1)


def _check_node(path: str, node: Any, bits: int) -> Tuple[int, ...]:
  from bsq_jax import bitplanes as bp
  if not 0 <= bits <= 16:
    raise ExportError(f"{path}: precision {bits} out of range 0..16")
  if isinstance(node, bp.BitPlanes):
    if node.bits != bits:
      raise ExportError(f"{path}: planes hold {node.bits} bits, the scheme "
                        f"says {bits}")
    return tuple(np.shape(node.pos)[:-1])
  if isinstance(node, bp.Levels):
    return tuple(np.shape(node.c))
  raise ExportError(f"{path}: expected BitPlanes or Levels, got "
                    f"{type(node).__name__}")


def tensor_levels(items: Sequence[Tuple[str, Any, int]]) -> List[PackedTensor]:
  """Integer levels of (path, BitPlanes / Levels node, precision) triples.

  q is read off `bitplanes.quantize_ste`'s output (q / K), computed the way
  the network computes it, so it is what the network rounds to.
  """
  from bsq_jax import bitplanes as bp
  shapes = [_check_node(p, v, n) for p, v, n in items]
  live = [(p, v, n) for p, v, n in items if n > 0]
  host = [type(v)(*(np.asarray(x, np.float32) for x in v)) for _, v, _ in live]
  out = _levels_fn()(host, tuple(n for _, _, n in live)) if live else []
  by_path = {p: np.asarray(r) for (p, _, _), r in zip(live, out)}
  tensors = []
  for (path, node, bits), shape in zip(items, shapes):
    scale = np.float32(np.asarray(node.scale, np.float32))
    if bits == 0:
      zeros = np.zeros(shape, bool)
      tensors.append(PackedTensor(path, shape, 0, scale, zeros,
                                  zeros.astype(np.uint16)))
      continue
    r = by_path[path]
    if not np.all(np.isfinite(r)):
      raise ExportError(f"{path}: non-finite weights cannot be packed")
    mag = np.rint(np.abs(r.astype(np.float64)) * bp.steps(bits))
    tensors.append(PackedTensor(path, shape, bits, scale, np.signbit(r),
                                mag.astype(np.uint16)))
  return tensors


def _check_scheme(mode: str, scheme: Optional[Mapping[str, int]],
                  params: Mapping[str, Any]) -> Dict[str, int]:
  from bsq_jax import bitplanes as bp
  from bsq_jax import scheme as sch
  if mode not in EXPORT_MODES:
    raise ExportError(f"mode: expected one of {EXPORT_MODES}, got {mode!r}")
  nodes = dict(sch.quantized(params))
  kind = bp.BitPlanes if mode == "bsq" else bp.Levels
  if any(not isinstance(v, kind) for v in nodes.values()):
    raise ExportError(f"{mode} mode: expected {kind.__name__} nodes, found "
                      f"{sorted({type(v).__name__ for v in nodes.values()})}")
  if mode == "bsq":
    found = sch.scheme_of(params)
    if scheme is not None and dict(scheme) != found:
      diff = sorted(k for k in set(found) | set(scheme)
                    if found.get(k) != scheme.get(k))
      raise ExportError(f"scheme disagrees with the planes' precisions on "
                        f"{diff}")
    scheme = found
  elif scheme is None:
    raise ExportError("finetune mode needs the scheme (Levels do not hold "
                      "their precision)")
  if set(scheme) != set(nodes):
    raise ExportError(f"scheme and params disagree on layers "
                      f"{sorted(set(scheme) ^ set(nodes))}")
  return {k: int(v) for k, v in scheme.items()}


def model_layout(model_cfg: Mapping[str, Any], mode: str,
                 scheme: Optional[Mapping[str, int]]):
  """(model, abstract variables, [(collection, path)] in network order).

  The order is the order the model creates its variables in, which is the
  order of the layers in the network (jax's trees sort dict keys instead).
  """
  import jax
  import jax.numpy as jnp
  from bsq_jax import scheme as sch
  from bsq_jax.layers import Quant
  from bsq_jax.models import build_model, input_shape
  try:
    model = build_model(model_cfg, Quant(mode, scheme))
    sample = jnp.zeros((1,) + tuple(input_shape(model_cfg)), jnp.float32)
    order: List[Tuple[str, str]] = []

    def init():
      v = model.init(jax.random.key(0), sample, train=False)
      order.extend((c, p) for c in v for p, _ in sch.walk(v[c]))
      return v
    abstract = jax.eval_shape(init)
  except (KeyError, ValueError, TypeError) as e:
    raise ExportError(f"cannot build the model of config {dict(model_cfg)}: "
                      f"{str(e).splitlines()[0] if str(e) else e!r}") from None
  return model, abstract, order


def _shapes(variables: Mapping[str, Any], collections) -> Dict[str, Any]:
  from bsq_jax import scheme as sch
  out = {}
  for c in collections:
    for p, v in sch.walk(variables.get(c, {})):
      out[f"{c}/{p}"] = ((type(v).__name__,) + tuple(
          tuple(np.shape(x)) for x in v) if isinstance(v, sch.QUANT_NODES)
                         else tuple(np.shape(v)))
  return out


def check_layout(variables: Mapping[str, Any], abstract: Mapping[str, Any]
                 ) -> None:
  """Raises ExportError unless `variables` has the model's tensors and shapes
  (collections the model does not declare are ignored)."""
  got, want = _shapes(variables, abstract), _shapes(abstract, abstract)
  if got != want:
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    first = "; ".join(f"{k}: {got.get(k, 'missing')} vs {want.get(k, 'none')}"
                      for k in diff[:3])
    raise ExportError(f"tensors do not match the model the config builds "
                      f"(given vs expected): {first}{more}")


def model_tensors(model_cfg: Mapping[str, Any], mode: str,
                  scheme: Optional[Mapping[str, int]],
                  variables: Mapping[str, Any]
                  ) -> Tuple[Dict[str, int], List[Tuple[str, str, Any]]]:
  """What export writes and inspect reports, in network order.

  Checks `variables` against the model `model_cfg` builds in `mode`; returns
  the scheme and (collection, path, PackedTensor | float32 array) entries.
  """
  from bsq_jax import scheme as sch
  scheme = _check_scheme(mode, scheme, variables["params"])
  _, abstract, order = model_layout(model_cfg, mode, scheme)
  check_layout(variables, abstract)
  leaves = {c: dict(sch.walk(variables[c])) for c in abstract}
  quantized = [(p, leaves[c][p], scheme[p]) for c, p in order
               if c == "params" and p in scheme]
  levels = {t.path: t for t in tensor_levels(quantized)}
  entries = []
  for c, p in order:
    if c == "params" and p in scheme:
      entries.append((c, p, levels[p]))
      continue
    arr = np.asarray(leaves[c][p])
    if not np.issubdtype(arr.dtype, np.floating):
      raise ExportError(f"{c}/{p}: expected a float array, got {arr.dtype}")
    entries.append((c, p, arr.astype(np.float32)))
  return scheme, entries


# --------------------------------------------------------------------------
# Writing.


def _pack(t: PackedTensor) -> bytes:
  scale = np.asarray(t.scale, "<f4").tobytes()
  if t.bits == 0:
    return scale
  n = t.bits
  mag = t.magnitude.reshape(-1).astype(np.uint32)
  bits = np.empty((mag.size, n + 1), np.uint8)
  bits[:, 0] = t.sign.reshape(-1)
  bits[:, 1:] = (mag[:, None] >> np.arange(n - 1, -1, -1, dtype=np.uint32)) & 1
  return scale + np.packbits(bits.reshape(-1), bitorder="big").tobytes()


@dataclasses.dataclass(frozen=True)
class ExportStats:
  """Sizes of one exported file, with the paper's and the real ratios."""
  path: str
  mode: str
  file_bytes: int
  header_bytes: int         # 20-byte prefix + JSON header
  packed_weight_bytes: int  # sign + n magnitude bits per weight, packed
  scale_bytes: int          # 4 per quantized tensor
  float_bytes: int          # BatchNorm, float shortcuts, PACT alphas (f32)
  float32_bytes: int        # the whole model at 4 bytes per value
  total_params: int         # TP (quantized weights)
  total_bits: int           # TB = sum m n (paper's count, no sign bit)
  average_bits: float
  paper_compression: float  # 32 TP / TB
  real_ratio: float         # float32_bytes / file_bytes

  def summary(self) -> str:
    return (
        f"{self.path}: {self.file_bytes} bytes ({self.mode} model; header "
        f"{self.header_bytes}, packed weights {self.packed_weight_bytes}, "
        f"scales {self.scale_bytes}, float parts {self.float_bytes})\n"
        f"paper's accounting: {self.total_params} weights, {self.total_bits} "
        f"bits, {self.average_bits:.3f} bits/weight, compression "
        f"{self.paper_compression:.2f}x (n bits per weight, quantized layers "
        f"only)\n"
        f"real size: float32 model {self.float32_bytes} bytes / file "
        f"{self.file_bytes} bytes = {self.real_ratio:.2f}x (n+1 bits per "
        f"weight, scales, float parts and header included)")


def _json_value(x):
  if isinstance(x, Mapping):
    return {str(k): _json_value(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_value(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def export_model(path: str, model_cfg: Mapping[str, Any], mode: str,
                 scheme: Optional[Mapping[str, int]],
                 variables: Mapping[str, Any]) -> ExportStats:
  """Writes the packed file for a trained model; returns its sizes.

  mode: "bsq" (params hold BitPlanes; `scheme` may be None, it is read off
  the planes) or "finetune" (params hold Levels; `scheme` is required).
  variables: {"params": ..., "batch_stats": ...}, checked against the model
  `model_cfg` builds (collections the model does not declare are left out).
  Tensors are written in network order (the order the model creates them).
  """
  path = os.fspath(path)
  try:
    scheme, entries = model_tensors(model_cfg, mode, scheme, variables)
  except ExportError as e:
    raise ExportError(f"{path}: cannot export: {e}") from None
  table, blobs, offset, tensors = [], [], 0, []
  packed = scales = float_bytes = float_elements = 0
  for collection, leaf_path, value in entries:
    if isinstance(value, PackedTensor):
      blob = _pack(value)
      entry = dict(kind="quantized", shape=list(value.shape), bits=value.bits)
      packed += len(blob) - SCALE_BYTES
      scales += SCALE_BYTES
      tensors.append(value)
    else:
      blob = np.ascontiguousarray(value, "<f4").tobytes()
      entry = dict(kind="float32", shape=list(value.shape), bits=32)
      float_bytes += len(blob)
      float_elements += value.size
    table.append(dict(collection=collection, path=leaf_path, **entry,
                      offset=offset, length=len(blob)))
    blobs.append(blob)
    offset += len(blob)
  payload = b"".join(blobs)
  sizes = {t.path: t.size for t in tensors}
  tp = sum(sizes.values())
  tb = sum(sizes[k] * scheme[k] for k in sizes)
  accounting = dict(total_params=tp, total_bits=tb,
                    average_bits=tb / max(tp, 1),
                    compression=32.0 * tp / max(tb, 1))
  header = dict(magic=MAGIC.rstrip(b"\x00").decode(),
                format_version=FORMAT_VERSION,
                model_config=_json_value(dict(model_cfg)), mode=mode,
                scheme={t.path: t.bits for t in tensors},
                payload_bytes=len(payload),
                payload_sha256=hashlib.sha256(payload).hexdigest(),
                accounting=accounting, tensors=table)
  try:
    head = json.dumps(header, separators=(",", ":")).encode()
  except TypeError as e:
    raise ExportError(f"{path}: cannot export: model config is not JSON "
                      f"({e})") from None
  prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, len(head), zlib.crc32(head))
  data = prefix + head + payload
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    raise ExportError(f"{path}: cannot write: {e.strerror or e}") from None
  float32_bytes = 4 * (tp + float_elements)
  assert len(data) == formula_bytes(scheme, sizes, float_elements) + len(head)
  return ExportStats(
      path=path, mode=mode, file_bytes=len(data),
      header_bytes=len(prefix) + len(head), packed_weight_bytes=packed,
      scale_bytes=scales, float_bytes=float_bytes, float32_bytes=float32_bytes,
      total_params=tp, total_bits=tb, average_bits=accounting["average_bits"],
      paper_compression=accounting["compression"],
      real_ratio=float32_bytes / len(data))


# --------------------------------------------------------------------------
# Reading (numpy only).


@dataclasses.dataclass(frozen=True)
class PackedModel:
  """The decoded contents of a packed file (numpy only)."""
  path: str
  header: Dict[str, Any]
  quantized: Dict[str, PackedTensor]  # scheme path -> tensor, payload order
  floats: Dict[str, np.ndarray]       # "collection/path" -> float32 array
  file_bytes: int

  @property
  def model_config(self) -> Dict[str, Any]:
    return self.header["model_config"]

  @property
  def scheme(self) -> Dict[str, int]:
    return self.header["scheme"]

  @property
  def float_elements(self) -> int:
    return sum(a.size for a in self.floats.values())


def _unpack(blob: bytes, shape: Tuple[int, ...], bits: int, path: str
            ) -> PackedTensor:
  scale = np.frombuffer(blob[:SCALE_BYTES], "<f4")[0].astype(np.float32)
  m = int(np.prod(shape, dtype=np.int64))
  if bits == 0:
    zeros = np.zeros(shape, bool)
    return PackedTensor(path, shape, 0, scale, zeros, zeros.astype(np.uint16))
  stream = np.unpackbits(np.frombuffer(blob, np.uint8, offset=SCALE_BYTES),
                         count=m * (bits + 1), bitorder="big")
  stream = stream.reshape(m, bits + 1)
  weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint32)
  mag = (stream[:, 1:].astype(np.uint32) @ weights).astype(np.uint16)
  return PackedTensor(path, shape, bits, scale,
                      stream[:, 0].astype(bool).reshape(shape),
                      mag.reshape(shape))


def _check_header(path: str, header: Any, payload_bytes: int) -> None:
  def bad(what):
    raise ExportError(f"{path}: malformed header: {what}")
  if not isinstance(header, dict):
    bad("expected a JSON object")
  for key in ("model_config", "mode", "scheme", "tensors", "payload_bytes",
              "payload_sha256"):
    if key not in header:
      bad(f"missing key {key!r}")
  expect = 0
  seen = set()
  for i, t in enumerate(header["tensors"]):
    try:
      shape = tuple(int(d) for d in t["shape"])
      bits, kind = int(t["bits"]), t["kind"]
      name = f"{t['collection']}/{t['path']}"
      offset, length = int(t["offset"]), int(t["length"])
    except (KeyError, TypeError, ValueError):
      bad(f"tensor {i} lacks collection/path/kind/shape/bits/offset/length")
    m = int(np.prod(shape, dtype=np.int64))
    if kind == "float32":
      want = 4 * m
    elif kind == "quantized":
      if not 0 <= bits <= 16 or t["collection"] != "params":
        bad(f"{name}: quantized tensor with bits {bits}")
      if header["scheme"].get(t["path"]) != bits:
        bad(f"{name}: table says {bits} bits, scheme says "
            f"{header['scheme'].get(t['path'])}")
      want = SCALE_BYTES + packed_bytes(m, bits)
    else:
      bad(f"{name}: unknown kind {kind!r}")
    if offset != expect or length != want or name in seen:
      bad(f"{name}: expected offset {expect} and length {want}, got "
          f"{offset} and {length}")
    seen.add(name)
    expect += length
  if expect != header["payload_bytes"] or expect != payload_bytes:
    bad(f"tensors span {expect} bytes, payload is {payload_bytes}")
  quantized = {t["path"] for t in header["tensors"] if t["kind"] == "quantized"}
  if quantized != set(header["scheme"]):
    bad(f"scheme and tensor table disagree on "
        f"{sorted(quantized ^ set(header['scheme']))}")


def read_packed(path: str) -> PackedModel:
  """Reads and verifies a packed file; numpy only (no JAX, no torch)."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ExportError(f"{path}: no such file (expected a BSQ packed model "
                      f"file)") from None
  except OSError as e:
    raise ExportError(f"{path}: cannot read: {e.strerror or e}") from None
  if len(data) < PREFIX_BYTES:
    if not MAGIC.startswith(data[:len(MAGIC)]):
      raise ExportError(f"{path}: not a BSQ packed model file (expected magic "
                        f"{MAGIC!r})")
    raise ExportError(f"{path}: truncated: {len(data)} bytes, shorter than "
                      f"the {PREFIX_BYTES}-byte prefix")
  magic, version, head_len, head_crc = PREFIX.unpack_from(data)
  if magic != MAGIC:
    raise ExportError(f"{path}: not a BSQ packed model file (expected magic "
                      f"{MAGIC!r}, found {magic!r})")
  if version != FORMAT_VERSION:
    raise ExportError(f"{path}: unsupported format version {version} (this "
                      f"reader reads version {FORMAT_VERSION})")
  if len(data) < PREFIX_BYTES + head_len:
    raise ExportError(f"{path}: truncated: {len(data)} bytes, the header "
                      f"alone needs {PREFIX_BYTES + head_len}")
  head = data[PREFIX_BYTES:PREFIX_BYTES + head_len]
  if zlib.crc32(head) != head_crc:
    raise ExportError(f"{path}: corrupt header: CRC-32 {zlib.crc32(head):08x}"
                      f", expected {head_crc:08x}")
  try:
    header = json.loads(head.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ExportError(f"{path}: malformed header: {e}") from None
  if not isinstance(header, dict) or (
      header.get("magic"), header.get("format_version")) != (
          MAGIC.rstrip(b"\x00").decode(), FORMAT_VERSION):
    raise ExportError(f"{path}: malformed header: magic/format_version "
                      f"disagree with the prefix")
  payload = data[PREFIX_BYTES + head_len:]
  want = header.get("payload_bytes")
  if isinstance(want, int) and len(payload) != want:
    what = "truncated" if len(payload) < want else "trailing bytes"
    raise ExportError(f"{path}: {what}: {len(data)} bytes, the header "
                      f"promises {PREFIX_BYTES + head_len + want}")
  digest = hashlib.sha256(payload).hexdigest()
  if digest != header.get("payload_sha256"):
    raise ExportError(f"{path}: corrupt payload: SHA-256 {digest[:16]}..., "
                      f"expected {str(header.get('payload_sha256'))[:16]}...")
  _check_header(path, header, len(payload))
  quantized, floats = {}, {}
  for t in header["tensors"]:
    blob = payload[t["offset"]:t["offset"] + t["length"]]
    shape = tuple(t["shape"])
    if t["kind"] == "quantized":
      quantized[t["path"]] = _unpack(blob, shape, t["bits"], t["path"])
    else:
      floats[f"{t['collection']}/{t['path']}"] = (
          np.frombuffer(blob, "<f4").astype(np.float32).reshape(shape))
  return PackedModel(path, header, quantized, floats, len(data))


# --------------------------------------------------------------------------
# Loading into Flax.


def _nest(flat: Mapping[str, Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def load_model(path: str, mode: str = "finetune"):
  """(model, variables) of a packed file; `model.apply(variables, x,
  train=False)` gives the trained network's logits bit for bit.

  mode "finetune" (default): each quantized tensor is a `Levels` with
    c = q / K(n) in float32; `quantize_ste` rounds it back to exactly q, so
    the weights equal the trained ones bit for bit (signed zeros included).
    A fixed-scheme model, ready for inference or further finetuning.
  mode "bsq": each quantized tensor is a `BitPlanes` holding the binary
    decomposition of q (as `bitplanes.encode_levels` makes it), ready for
    further BSQ training; weights equal the trained ones as values (binary
    planes cannot make -0.0: such a weight becomes 0.0, which changes no
    sum that has a nonzero term).
  """
  if mode not in EXPORT_MODES:
    raise ValueError(f"mode: expected one of {EXPORT_MODES}, got {mode!r}")
  packed = read_packed(path)
  import jax
  import jax.numpy as jnp
  from bsq_jax import bitplanes as bp

  flat = {}
  for t in packed.header["tensors"]:
    name = f"{t['collection']}/{t['path']}"
    if t["kind"] == "float32":
      flat[name] = packed.floats[name]
      continue
    pt = packed.quantized[t["path"]]
    if mode == "finetune":
      flat[name] = bp.Levels(c=pt.unscaled(), scale=pt.scale)
    else:
      flat[name] = bp.encode_levels(pt.unscaled(), pt.bits, pt.scale)
  variables = jax.tree.map(jnp.asarray, _nest(flat))
  try:
    model, abstract, _ = model_layout(packed.model_config, mode,
                                      packed.scheme)
    check_layout(variables, abstract)
  except ExportError as e:
    raise ExportError(f"{path}: {e}") from None
  return model, variables


# --------------------------------------------------------------------------
# CLI.


def load_run(workdir: str, stage: Optional[str] = None):
  """A training run's result via `bsq_jax.checkpoint.load_result`: an object
  with model_config, mode, scheme and variables (imported only here)."""
  from bsq_jax import checkpoint  # pylint: disable=import-outside-toplevel
  return checkpoint.load_result(workdir, stage=stage)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m bsq_jax.export",
      description="Write a training run's result as a packed model file.")
  parser.add_argument("--workdir", required=True, help="the run directory")
  parser.add_argument("--stage", default=None,
                      help="which stage's result, e.g. finetune or bsq "
                           "(default: the last finished of finetune, bsq)")
  parser.add_argument("--out", required=True, help="the file to write")
  args = parser.parse_args(argv)
  try:
    result = load_run(args.workdir, args.stage)
    stats = export_model(args.out, result.model_config, result.mode,
                         result.scheme, result.variables)
  except (ExportError, ValueError, KeyError, OSError, ImportError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"export: error: {msg}", file=sys.stderr)
    return 1
  print(stats.summary())
  return 0


if __name__ == "__main__":
  sys.exit(main())
