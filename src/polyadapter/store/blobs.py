"""Content-addressed weight blobs: ``blobs/ab/abcdef...`` holds safetensors bytes whose
sha256 is the file name.

Writes are durable before anyone may name them: bytes go to a temporary file under
``tmp/`` (same file system), which is fsynced, renamed into place and whose folder is
fsynced; only then does the caller commit the index row. A crash leaves at worst a temp
file or an unreferenced blob, both removed by ``gc``. Every path here is built from a
sha256 hex digest checked against ``[0-9a-f]{64}``, never from user input.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import time
from pathlib import Path

import torch

BLOBS = "blobs"
TMP = "tmp"
_HEX = re.compile(r"[0-9a-f]{64}")
TMP_SUFFIX = ".part"
STALE_TEMP_S = 24 * 3600  # a temp file this old is stale even if its writer's pid is alive (pid reuse)


class BlobError(Exception):
    """A blob is missing or does not hash to its name; the store names the adapter."""


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes: the same tensors always give the same bytes (and
    hash), whatever their order, device or memory layout; no metadata, so the only inputs
    are names, dtypes, shapes and values.

    For the common case (one dtype, a little-endian machine) the file is assembled here,
    byte for byte what ``safetensors.torch.save`` writes (tests compare the two), because
    that function's per-tensor overhead made it ~3x slower than the rest of an add for an
    18 MB adapter of 420 tensors. Anything else goes through safetensors itself."""
    ts = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
    dtypes = {t.dtype for t in ts.values()}
    code = _ST_DTYPES.get(next(iter(dtypes))) if len(dtypes) == 1 else None
    if code is None or sys.byteorder != "little":
        from safetensors.torch import save
        return save(ts)
    header, parts, offset = {}, [], 0
    for k, t in ts.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        if n:
            parts.append(t.reshape(-1).view(torch.uint8).numpy())
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * ((-len(text)) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *parts])


def bytes_to_tensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load
    return load(data)


def header_shapes(data: bytes) -> dict[str, list[int]]:
    """Tensor key -> shape from a safetensors buffer's header alone."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def is_canonical(data: bytes) -> bool:
    """True when ``data`` is byte for byte what :func:`tensors_to_bytes` writes for its
    tensors, told from the header alone: no metadata, one dtype, entries laid out in
    name order, compact JSON padded with spaces to 8 bytes, nothing after the data. A
    polyadapter-written ``adapter.safetensors`` is; then ``add`` stores the file's bytes
    as they are instead of parsing and re-serializing 18 MB. Anything else (another
    writer, several dtypes) answers False and takes the slow, always-canonical path."""
    if len(data) < 8:
        return False
    n = struct.unpack("<Q", data[:8])[0]
    if n % 8 or 8 + n > len(data):
        return False
    raw = data[8:8 + n]
    try:
        header = json.loads(raw)
    except ValueError:
        return False
    if not isinstance(header, dict) or "__metadata__" in header or not header:
        return False
    try:
        if len({v["dtype"] for v in header.values()}) != 1:
            return False
        entries, offset = {}, 0
        for k in sorted(header):
            v = header[k]
            start, end = v["data_offsets"]
            count = 1
            for d in v["shape"]:
                count *= int(d)
            if start != offset or end - start != count * _ITEMSIZE[v["dtype"]]:
                return False
            offset = end
            entries[k] = {"dtype": v["dtype"], "shape": v["shape"], "data_offsets": [start, end]}
    except (KeyError, TypeError, ValueError):
        return False
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * ((-len(text)) % 8)
    return text == raw and 8 + n + offset == len(data)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_path(root: Path, sha: str) -> Path:
    if not isinstance(sha, str) or not _HEX.fullmatch(sha):
        raise ValueError(f"not a sha256 hex digest: {sha!r}")
    return root / BLOBS / sha[:2] / sha


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (POSIX: fsync the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


PARALLEL_HASH_BYTES = 1 << 20  # above this, hash in a thread while the temp file is written


def write_blob(root: Path, data: bytes, sha: str | None = None) -> tuple[str, bool]:
    """Store ``data``; returns (sha256, written). Already present with the right size:
    nothing is written (identical adapters share one blob). Large blobs are hashed in a
    thread while being written (hashlib and os.write both release the GIL), so the
    hash costs no wall time beyond the write and fsync it overlaps."""
    if sha is None and len(data) > PARALLEL_HASH_BYTES:
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hashing = pool.submit(sha256_of, data)
            tmp = _write_temp(root, data)
            sha = hashing.result()
        path = blob_path(root, sha)
        if path.is_file() and path.stat().st_size == len(data):
            _unlink(tmp)
            return sha, False
        return sha, _install(tmp, path)
    sha = sha or sha256_of(data)
    path = blob_path(root, sha)
    if path.is_file() and path.stat().st_size == len(data):
        return sha, False
    return sha, _install(_write_temp(root, data), path)


def _install(tmp: Path, path: Path) -> bool:
    """Rename the fsynced temp file into place and make the rename durable."""
    folder = path.parent
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(folder.parent)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(folder)
    return True


def _write_temp(root: Path, data: bytes) -> Path:
    """``data`` in a new temp file under ``tmp/``, fsynced."""
    tmp_dir = root / TMP
    tmp = tmp_dir / f"{os.getpid()}-{os.urandom(6).hex()}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:  # tmp/ removed by hand: recreate it
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    return tmp


def read_blob(root: Path, sha: str) -> bytes:
    """The bytes of blob ``sha``, checked against their hash; BlobError otherwise."""
    path = blob_path(root, sha)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BlobError(f"weights blob {path} is missing") from None
    got = sha256_of(data)
    if got != sha:
        raise BlobError(f"weights blob {path} is corrupt: its sha256 is {got[:16]}..., expected {sha[:16]}... "
                        f"({len(data)} bytes)")
    return data


def check_blob(root: Path, sha: str, size: int | None = None) -> str | None:
    """None when blob ``sha`` is present and hashes right, else what is wrong. Hashes in
    chunks, so verifying a large store needs little memory."""
    path = blob_path(root, sha)
    if not path.is_file():
        return f"blob {sha} is missing ({path})"
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    if h.hexdigest() != sha:
        return f"blob {sha} is corrupt: sha256 {h.hexdigest()[:16]}..., {n} bytes" + \
            (f" (recorded size {size})" if size is not None and size != n else "")
    return None


def blob_files(root: Path) -> dict[str, Path]:
    """sha -> path of every blob file on disk (names that are not digests are skipped)."""
    out = {}
    base = root / BLOBS
    if not base.is_dir():
        return out
    for sub in base.iterdir():
        if sub.is_dir() and len(sub.name) == 2:
            for f in sub.iterdir():
                if _HEX.fullmatch(f.name) and f.name[:2] == sub.name:
                    out[f.name] = f
    return out


def stale_temp_files(root: Path, now: float | None = None) -> list[Path]:
    """Temp files whose writer is gone (its pid no longer runs) or that are very old."""
    now = time.time() if now is None else now
    out = []
    folder = root / TMP
    if not folder.is_dir():
        return out
    for f in folder.iterdir():
        if not f.name.endswith(TMP_SUFFIX):
            continue
        pid_text = f.name.split("-", 1)[0]
        try:
            age = now - f.stat().st_mtime
        except FileNotFoundError:  # its writer just renamed it into place
            continue
        if age > STALE_TEMP_S or not (pid_text.isdigit() and _alive(int(pid_text))):
            out.append(f)
    return out


def remove(path: Path) -> bool:
    return _unlink(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
