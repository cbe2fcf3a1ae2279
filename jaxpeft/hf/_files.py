"""HF adapter directories on disk: an export that replaces the config/tensor pair together, and a strict reader.

**Writing.** Both files are serialised in memory first (so a bad value fails before anything is written), written
and fsynced in a staging directory, then moved in:

- a new directory is the staging directory renamed into place: one atomic step;
- an existing directory gets its pair replaced file by file, in an order chosen so that no reader ever sees a
  mixed pair: the old ``adapter_config.json`` is moved out first, then the tensors are swapped, and the new config
  moved in last (the commit). An exception on the way puts the old pair back. A process killed on the way leaves
  the directory without ``adapter_config.json`` (PEFT and jaxpeft then refuse to load it, naming the cause) and
  the old and new files in ``<dir>/.jaxpeft-export/``; exporting again finishes the job.

Other files in the directory (a README.md, tokenizer files, ...) are never touched. One export at a time per
directory: a second concurrent one is refused (an ``flock`` on ``.jaxpeft-export.lock``, which the kernel
releases when a process dies, so a killed export never blocks the next one).

**Reading.** ``adapter_config.json`` must be a UTF-8 JSON object; ``adapter_model.safetensors`` is parsed here
(header, dtypes, offsets and sizes checked; F16, BF16, F32 and F64 read, bfloat16 included). Any defect is a
``ValueError`` naming the file, what is wrong and the fix. The pair is read again if the config changed while the
tensors were read (an export running concurrently).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxpeft.hf._config import CONFIG_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: exports are not serialised
    fcntl = None  # type: ignore[assignment]

WEIGHTS_NAME = "adapter_model.safetensors"
STAGING = ".jaxpeft-export"
_LOCK_SUFFIX = ".lock"
_DTYPES = {"F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16), "F32": np.dtype(np.float32)}
_DTYPES["F64"] = np.dtype(np.float64)


# ----------------------------------------------------------------------------------------------- writing


def serialise(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, bytes]:
    """``{file name: bytes}`` of the pair; raises ``ValueError`` before anything is written."""
    from safetensors.numpy import save

    try:
        text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"the HF config cannot be written as JSON ({err}); {dict(config)!r:.200}") from None
    # safetensors writes each array's buffer as it lies in memory: a non-contiguous view would be scrambled
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return {CONFIG_NAME: text.encode("utf-8"), WEIGHTS_NAME: save(arrays, {"format": "pt"})}


def fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def export_lock(lock_path: str, directory: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created; removed on exit) or refuse naming the holder."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.read(fd, 200).decode("utf-8", "replace").strip()
            os.close(fd)
            raise ValueError(
                f"another export into {directory!r} is running ({holder or 'owner unknown'}; lock {lock_path!r}). "
                "Wait for it, or export to another directory."
            ) from None
        try:  # the file we locked may have been removed by the previous holder: then lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock_path)
        os.close(fd)


def fresh_staging(path: str) -> str:
    """An empty staging directory at ``path``; what a killed export left there is removed (we hold the lock)."""
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.mkdir(path)
    return path


def write_directory(directory: str | os.PathLike[str], config: Mapping[str, Any], tensors: Mapping[str, Any]) -> str:
    """Write the pair into ``directory`` (see the module docstring for the guarantees); the absolute path."""
    payload = serialise(config, tensors)
    directory = os.path.abspath(os.fspath(directory))
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ValueError(f"export target {directory!r} exists and is not a directory; pass a directory path.")
    if os.path.isdir(directory):
        with export_lock(os.path.join(directory, STAGING + _LOCK_SUFFIX), directory):
            _replace_pair(directory, payload, fresh_staging(os.path.join(directory, STAGING)))
        return directory
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}{STAGING}")
    with export_lock(staging + _LOCK_SUFFIX, directory):
        fresh_staging(staging)
        try:
            for file, data in payload.items():
                write_file(os.path.join(staging, file), data)
            try:
                os.rename(staging, directory)  # atomic: the directory appears with both files
            except OSError:
                if not os.path.isdir(directory):
                    raise
                raise ValueError(
                    f"{directory!r} was created by someone else during the export; nothing was written. Export again."
                ) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(parent)
    return directory


def _replace_pair(directory: str, payload: Mapping[str, bytes], staging: str) -> None:
    """Swap the pair in ``directory`` through ``staging``: config out, tensors swapped, config in (the commit)."""
    moved: list[str] = []  # files of the old pair moved into staging, in order
    placed: list[str] = []  # new files moved into the directory
    try:
        for file, data in payload.items():
            write_file(os.path.join(staging, "new-" + file), data)
        for file in (CONFIG_NAME, WEIGHTS_NAME):  # from here until the commit, the directory has no config
            if os.path.lexists(os.path.join(directory, file)):
                os.replace(os.path.join(directory, file), os.path.join(staging, "old-" + file))
                moved.append(file)
        fsync_dir(directory)
        for file in (WEIGHTS_NAME, CONFIG_NAME):  # the config last: the commit point
            os.replace(os.path.join(staging, "new-" + file), os.path.join(directory, file))
            placed.append(file)
    except BaseException:
        for file in placed:
            if file not in moved:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, file))
        for file in reversed(moved):  # the config goes back last, so a mixed pair is never visible
            os.replace(os.path.join(staging, "old-" + file), os.path.join(directory, file))
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(directory)
    shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- reading


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        config = json.loads(text)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path!r} is not UTF-8 text ({err}); expected the JSON PeftModel.save_pretrained writes."
        ) from None
    except RecursionError:
        raise ValueError(f"{path!r} nests JSON too deeply to be an adapter config.") from None
    except ValueError as err:
        raise ValueError(
            f"{path!r} is not valid JSON ({err}); the file is truncated or was edited by hand. Re-export it, or fix "
            "it so that json.load reads it."
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{path!r} holds a JSON {type(config).__name__}, not an object; expected the "
            '{"peft_type": ..., "r": ..., ...} that PeftModel.save_pretrained writes.'
        )
    return config


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file, every header entry checked; floating dtypes only."""
    with open(path, "rb") as f:
        data = f.read()
    fix = "Re-export it, or download it again."
    if len(data) < 8:
        raise ValueError(f"{path!r} has {len(data)} bytes: too short for a safetensors file. {fix}")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(
            f"{path!r} is truncated: its safetensors header announces {size} bytes, the file holds {len(data) - 8} "
            f"after the length. {fix}"
        )
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path!r} has a corrupt safetensors header ({err}). {fix}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path!r} has a corrupt safetensors header (not a JSON object). {fix}")
    body = memoryview(data)[8 + size :]
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= len(body)
        ):
            raise ValueError(f"{path!r}: the header entry of tensor {key!r} is corrupt ({info!r:.120}). {fix}")
        if dtype not in _DTYPES:
            raise ValueError(
                f"{path!r}: tensor {key!r} has dtype {dtype}; adapter tensors are floating point (F16, BF16, F32 or "
                "F64). Is this the adapter file of a float model?"
            )
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(
                f"{path!r}: tensor {key!r} of shape {tuple(shape)} needs {nbytes} bytes, its header gives "
                f"{offsets[1] - offsets[0]}. The file is corrupt. {fix}"
            )
        array = np.frombuffer(body[offsets[0] : offsets[1]], dtype=_DTYPES[dtype])
        if sys.byteorder == "big":  # pragma: no cover - safetensors is little-endian
            array = array.byteswap()
        tensors[key] = array.reshape(shape).copy()
    return tensors


def read_directory(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, tensors)`` of a HF PEFT adapter directory; a pickled ``adapter_model.bin`` is refused."""
    directory = os.path.abspath(os.fspath(directory))
    config_file = os.path.join(directory, CONFIG_NAME)
    weights_file = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no directory {directory!r}; expected a PeftModel.save_pretrained directory.")
    for _ in range(3):
        try:
            before = os.stat(config_file)
        except FileNotFoundError:
            raise FileNotFoundError(_missing_config(directory)) from None
        if not os.path.isfile(weights_file):
            legacy = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
            hint = (
                " It has a pickled adapter_model.bin, which jaxpeft does not read; re-save it with "
                "safe_serialization=True."
                if legacy
                else ""
            )
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}.{hint}")
        config = _read_config(config_file)
        tensors = read_safetensors(weights_file)
        with contextlib.suppress(FileNotFoundError):
            after = os.stat(config_file)
            if (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size):
                return config, tensors
    raise ValueError(f"{directory!r} kept changing while it was read; is an export into it running?")


def _missing_config(directory: str) -> str:
    staging = os.path.join(directory, STAGING)
    if os.path.isdir(staging):
        return (
            f"no {CONFIG_NAME} in {directory!r}: a jaxpeft export into it is running or was interrupted ({staging!r} "
            "holds the "
            f"files it was swapping: new-* and, if there was one, the previous pair as old-*). Export again, or move "
            "the old-* files back (without the prefix) to restore the previous adapter."
        )
    return f"no {CONFIG_NAME} in {directory!r}; expected a PeftModel.save_pretrained directory."
