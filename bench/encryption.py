"""Encryption-at-rest micro-benchmark: what AES-256-GCM (storage/encryption.py) costs per file.

Measures, on the 7 MB CR chest radiograph (RG1_UNCR), in one process and one thread (what one
ingest costs one core):

* ``stage-plain``     — ``FileStore.stage_copy`` + wait, encryption off (hard link, hash);
* ``stage-encrypted`` — the same with a key: read, encrypt, hash the plaintext, write (+ fsync);
* ``open-plain`` / ``open-encrypted`` — ``FileStore.read_bytes`` of the stored file;
* ``encrypt`` / ``decrypt`` — the AEAD stream alone, memory to memory (MB/s).

Not a test: prints one JSON document. Run: ``python bench/encryption.py --repeat 20 [--fsync]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.encryption import Keyring, decrypt_stream, encrypt_stream  # noqa: E402
from storage.filestore import FileStore  # noqa: E402


def _median_ms(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--fsync", action="store_true", help="fsync staged files (as production does)")
    args = parser.parse_args()
    source = Path(str(get_testdata_file("RG1_UNCR.dcm")))
    data = source.read_bytes()
    size_mb = len(data) / 1e6
    keyring = Keyring("bench", {"bench": os.urandom(32)})
    results: dict[str, object] = {"file_mb": round(size_mb, 2), "repeat": args.repeat, "fsync": args.fsync}

    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        incoming = root / "tmp" / "incoming.dcm"
        incoming.parent.mkdir()
        incoming.write_bytes(data)  # on the staging file system, as pynetdicom's receive file is
        for label, ring in (("plain", None), ("encrypted", keyring)):
            store = FileStore(root / label, root / "tmp", fsync=args.fsync, keyring=ring)

            def stage(store: FileStore = store) -> None:
                staged = store.stage_copy(incoming)
                staged.wait()
                store.discard(staged)

            results[f"stage-{label}_ms"] = round(_median_ms(stage, args.repeat), 2)
            relative = store.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
            store.commit(store.stage_bytes(data), relative)
            results[f"open-{label}_ms"] = round(_median_ms(partial(store.read_bytes, relative), args.repeat), 2)
            store.close()

        sealed = io.BytesIO()
        encrypt_stream(io.BytesIO(data), sealed, keyring)
        encrypt_ms = _median_ms(lambda: encrypt_stream(io.BytesIO(data), io.BytesIO(), keyring), args.repeat)
        decrypt_ms = _median_ms(
            lambda: decrypt_stream(io.BytesIO(sealed.getvalue()), lambda _chunk: None, keyring), args.repeat
        )
        results["encrypt_mb_s"] = round(size_mb / (encrypt_ms / 1e3))
        results["decrypt_mb_s"] = round(size_mb / (decrypt_ms / 1e3))
        results["size_overhead_bytes"] = len(sealed.getvalue()) - len(data)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
