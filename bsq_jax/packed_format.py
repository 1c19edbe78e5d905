"""The packed model file's format: its bytes, its header, its sizes.

This module is the format alone, in numpy: it packs and unpacks integer
levels (`PackedTensor`) and float32 tensors, writes a file from a list of
them and reads one back with every check (`read_packed`). It knows nothing
of Flax: which tensors a model has and in what order is
`bsq_jax.model_tensors`'s business, rebuilding the model from a file is
`bsq_jax.packed_loader`'s, and `bsq_jax.export` ties them to a training run.
Kept apart so that a deployment reader needs this file and numpy only.

A quantized tensor of precision n is stored as the signed integer levels
q (|q| <= K(n) = 2**n - 1) and the float32 scale s of its weights
w = s * q / K(n); `bsq_jax.model_tensors` says how q comes from a network.

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
may reassociate, so a numpy reader agrees to within an ulp and
`packed_loader.load_model` is the bit-exact route); precision 0 gives
w = 0 * s.

Sizes. The paper counts n bits per weight (compression = 32 TP / TB). The file
needs n+1 bits per weight (the sign), the scales, the float parts and the
header:

    file bytes = 20 + H + sum_q (4 + ceil(m_q (n_q + 1) / 8)) + 4 F

with F the number of float32 values; `formula_bytes` gives all but H.

Errors: a missing, truncated, corrupt (CRC / SHA-256 mismatch), wrong-magic
or wrong-version file raises `ExportError` (a ValueError) with a one-line
message naming the file and what was expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zlib
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import numpy as np

MAGIC = b"BSQPACK\x00"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sIII")  # magic, version, header length, header crc32
PREFIX_BYTES = PREFIX.size  # 20
SCALE_BYTES = 4


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


def zero_tensor(path: str, shape: Tuple[int, ...], scale) -> PackedTensor:
  """A precision-0 tensor: all levels 0, only its scale is stored."""
  zeros = np.zeros(shape, bool)
  return PackedTensor(path, shape, 0, scale, zeros, zeros.astype(np.uint16))


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


# --------------------------------------------------------------------------
# Writing.

# (collection, path, value): a quantized tensor's levels or a float array.
Entry = Tuple[str, str, Union[PackedTensor, np.ndarray]]


def _pack(t: PackedTensor) -> bytes:
  """Scale, then sign and magnitude bits of each weight, MSB first."""
  scale = np.asarray(t.scale, "<f4").tobytes()
  if t.bits == 0:
    return scale
  n = t.bits
  mag = t.magnitude.reshape(-1).astype(np.uint32)
  bits = np.empty((mag.size, n + 1), np.uint8)
  bits[:, 0] = t.sign.reshape(-1)
  bits[:, 1:] = (mag[:, None] >> np.arange(n - 1, -1, -1, dtype=np.uint32)) & 1
  return scale + np.packbits(bits.reshape(-1), bitorder="big").tobytes()


def _json_value(x):
  if isinstance(x, Mapping):
    return {str(k): _json_value(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_value(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def _accounting(tensors: Sequence[PackedTensor]) -> Dict[str, Any]:
  """The paper's numbers (spec section 9) of the quantized tensors."""
  tp = sum(t.size for t in tensors)
  tb = sum(t.size * t.bits for t in tensors)
  return dict(total_params=tp, total_bits=tb, average_bits=tb / max(tp, 1),
              compression=32.0 * tp / max(tb, 1))


def _payload(entries: Sequence[Entry]):
  """(tensor table, payload bytes, quantized by path, floats by name)."""
  table, blobs, offset = [], [], 0
  quantized, floats = {}, {}
  for collection, leaf_path, value in entries:
    if isinstance(value, PackedTensor):
      blob = _pack(value)
      entry = dict(kind="quantized", shape=list(value.shape), bits=value.bits)
      quantized[value.path] = value
    else:
      blob = np.ascontiguousarray(value, "<f4").tobytes()
      entry = dict(kind="float32", shape=list(value.shape), bits=32)
      floats[f"{collection}/{leaf_path}"] = np.asarray(value, np.float32)
    table.append(dict(collection=collection, path=leaf_path, **entry,
                      offset=offset, length=len(blob)))
    blobs.append(blob)
    offset += len(blob)
  return table, b"".join(blobs), quantized, floats


def _write_atomically(path: str, data: bytes) -> None:
  # A temporary file and a rename: a reader never sees half a file.
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    raise ExportError(f"{path}: cannot write: {e.strerror or e}") from None


def write_packed(path: str, model_config: Mapping[str, Any], mode: str,
                 entries: Sequence[Entry]) -> PackedModel:
  """Writes `entries` (in payload order) as a packed file at `path`; returns
  what was written, as `read_packed` reads it. The header's keys are written
  in the order the format above lists them."""
  table, payload, quantized, floats = _payload(entries)
  header = dict(magic=MAGIC.rstrip(b"\x00").decode(),
                format_version=FORMAT_VERSION,
                model_config=_json_value(dict(model_config)), mode=mode,
                scheme={p: t.bits for p, t in quantized.items()},
                payload_bytes=len(payload),
                payload_sha256=hashlib.sha256(payload).hexdigest(),
                accounting=_accounting(list(quantized.values())),
                tensors=table)
  try:
    head = json.dumps(header, separators=(",", ":")).encode()
  except TypeError as e:
    raise ExportError(f"{path}: cannot export: model config is not JSON "
                      f"({e})") from None
  prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, len(head), zlib.crc32(head))
  data = prefix + head + payload
  _write_atomically(path, data)
  written = PackedModel(path, header, quantized, floats, len(data))
  assert len(data) == len(head) + formula_bytes(
      written.scheme, {p: t.size for p, t in quantized.items()},
      written.float_elements)
  return written


# --------------------------------------------------------------------------
# Reading (numpy only).


def _unpack(blob: bytes, shape: Tuple[int, ...], bits: int, path: str
                  ) -> PackedTensor:
  """The inverse of `_pack`."""
  scale = np.frombuffer(blob[:SCALE_BYTES], "<f4")[0].astype(np.float32)
  m = int(np.prod(shape, dtype=np.int64))
  if bits == 0:
    return zero_tensor(path, shape, scale)
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
