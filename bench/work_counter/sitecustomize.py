"""Bench-only work counter for ``pneumo serve``: how often each DICOM file is parsed and decoded.

Imported automatically by Python (``site``) when this folder is on ``PYTHONPATH``. It does
nothing at all unless ``PNEUMO_BENCH_COUNT_DIR`` is set; then it

* wraps ``pydicom.filereader.read_partial`` (the worker behind ``dcmread``) and counts each call as
  a ``full`` parse or a ``header`` parse (``stop_before_pixels`` / ``specific_tags``), keyed by
  where the file lies (``store``: ``<data_dir>/dicom``, ``staging``: ``<data_dir>/tmp`` — the
  received C-STORE before it is committed, ``other``, ``unnamed`` for buffers) and by what it is
  (``source`` image, generated ``sr`` / ``sc``, ``unknown``), from its SOP Class UID;
* counts pixel decodes at two levels: ``decodes`` — the outermost decode entry point on a thread
  (``inference.preprocess.decode``, ``pydicom.pixels.pixel_array``, ``Dataset.decompress``,
  ``Dataset.convert_pixel_data`` i.e. ``Dataset.pixel_array``), so nested calls count once, and
  only when a decoder actually ran inside it (a cached ``pixel_array`` is not a decode);
  ``decoder_calls`` — pydicom's ``Decoder.as_array`` / ``iter_array`` and the reduced JPEG 2000
  decode in ``inference.preprocess.decode_j2k_reduced`` (the actual decoder runs);
* keeps the same figures per SOP Instance UID;
* at interpreter exit (``atexit``; ``pneumo serve`` returns normally on SIGTERM, and so do its
  acceptor child processes) writes ``$PNEUMO_BENCH_COUNT_DIR/counts-<pid>.json``.

Patches are applied lazily, right after the target module is first imported (a meta path hook),
so nothing is imported early and product code is untouched. ``PNEUMO_BENCH_DATA_DIR`` (the
gateway's ``data_dir``) makes the location categories exact; without it a path containing a
``dicom`` folder counts as ``store``.
"""

from __future__ import annotations

import os
import sys


def _chain_next_sitecustomize() -> None:
    """Run the ``sitecustomize`` this file shadows (if any), so putting us first changes nothing."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None or spec.origin == os.path.abspath(__file__):
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["_bench_shadowed_sitecustomize"] = module
    spec.loader.exec_module(module)


def _install(out_dir: str) -> None:  # noqa: C901 - one closure keeps the whole hook in one place
    import atexit
    import functools
    import importlib.abc
    import json
    import threading
    import time

    lock = threading.Lock()
    local = threading.local()
    data_dir = os.environ.get("PNEUMO_BENCH_DATA_DIR")
    data_dir = os.path.realpath(data_dir) if data_dir else None
    counts: dict = {
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "hooks": [],
        "parses": {},  # "where/kind/mode" -> n
        "decodes": {},  # kind -> n (outermost decode entry points)
        "decoder_calls": {},  # kind -> n (pydicom decoder runs + reduced J2K decodes)
        "entry_points": {},  # which decode entry point was the outermost one -> n
        "seconds": {},
        "per_instance": {},  # SOP Instance UID -> {...}
    }

    def bump(table: str, key: str, n: float = 1) -> None:
        counts[table][key] = counts[table].get(key, 0) + n

    def kind_of(ds: object) -> tuple[str, str]:
        """(kind, SOP Instance UID) of a dataset, never raising."""
        try:
            meta = getattr(ds, "file_meta", None)
            cls = meta.get("MediaStorageSOPClassUID") if meta is not None else None
            uid = meta.get("MediaStorageSOPInstanceUID") if meta is not None else None
            getter = getattr(ds, "get", None)
            if getter is not None:
                cls = cls or getter("SOPClassUID")
                uid = uid or getter("SOPInstanceUID")
            cls, uid = str(cls or ""), str(uid or "")
        except Exception:  # noqa: BLE001 - counting must never break the gateway
            return "unknown", ""
        if not cls:
            kind = "unknown"
        elif cls.startswith("1.2.840.10008.5.1.4.1.1.88."):
            kind = "sr"
        elif cls.startswith("1.2.840.10008.5.1.4.1.1.7"):
            kind = "sc"
        else:
            kind = "source"
        return kind, uid

    def where_of(fileobj: object) -> str:
        name = getattr(fileobj, "name", None)
        if not isinstance(name, (str, bytes, os.PathLike)) or isinstance(name, int):
            return "unnamed"
        try:
            path = os.path.realpath(os.fsdecode(name))
        except Exception:  # noqa: BLE001
            return "unnamed"
        if data_dir is not None:
            if path.startswith(os.path.join(data_dir, "dicom") + os.sep):
                return "store"
            if path.startswith(os.path.join(data_dir, "tmp") + os.sep):
                return "staging"
            return "other"
        return "store" if f"{os.sep}dicom{os.sep}" in path else "other"

    def instance(uid: str, kind: str) -> dict:
        row = counts["per_instance"].get(uid)
        if row is None:
            row = {"kind": kind, "full": 0, "header": 0, "decode": 0, "decoder_calls": 0, "where": {}}
            counts["per_instance"][uid] = row
        return row

    # -- parsing ------------------------------------------------------------------------------

    def patch_filereader(module: object) -> None:
        original = module.read_partial  # type: ignore[attr-defined]

        @functools.wraps(original)
        def read_partial(fileobj, stop_when=None, defer_size=None, force=False, specific_tags=None):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            ds = original(fileobj, stop_when, defer_size=defer_size, force=force, specific_tags=specific_tags)
            seconds = time.perf_counter() - start
            try:
                mode = "header" if (stop_when is not None or specific_tags) else "full"
                where = where_of(fileobj)
                kind, uid = kind_of(ds)
                with lock:
                    bump("parses", f"{where}/{kind}/{mode}")
                    bump("seconds", f"parse/{where}/{kind}/{mode}", seconds)
                    if uid:
                        row = instance(uid, kind)
                        row[mode] += 1
                        row["where"][f"{where}/{mode}"] = row["where"].get(f"{where}/{mode}", 0) + 1
            except Exception:  # noqa: BLE001
                pass
            return ds

        module.read_partial = read_partial  # type: ignore[attr-defined]
        counts["hooks"].append("pydicom.filereader.read_partial")

    # -- decoding -----------------------------------------------------------------------------

    def depth() -> int:
        return getattr(local, "depth", 0)

    def record_decode(label: str, kind: str, uid: str, seconds: float) -> None:
        try:
            with lock:
                bump("decodes", kind)
                bump("entry_points", f"{label}/{kind}")
                bump("seconds", f"decode/{kind}", seconds)
                if uid:
                    instance(uid, kind)["decode"] += 1
        except Exception:  # noqa: BLE001
            pass

    def outer_decode(label: str, ds_of):  # type: ignore[no-untyped-def]
        """Decorator: count the call once when it is the outermost decode on this thread."""

        def wrap(original):  # type: ignore[no-untyped-def]
            @functools.wraps(original)
            def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
                if depth():
                    return original(*args, **kwargs)
                ds = ds_of(args, kwargs)
                # identify it now: Dataset.decompress may give it a new SOP Instance UID
                kind, uid = kind_of(ds) if ds is not None else ("unknown", "")
                local.depth, local.ds, local.inner = 1, ds, 0
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    seconds = time.perf_counter() - start
                    decoded = getattr(local, "inner", 0) > 0  # a cached pixel_array is no decode
                    local.depth, local.ds, local.inner = 0, None, 0
                    if decoded:
                        record_decode(label, kind, uid, seconds)

            return wrapper

        return wrap

    def first_arg(args, kwargs):  # type: ignore[no-untyped-def]
        return args[0] if args else kwargs.get("ds", kwargs.get("src"))

    def self_arg(args, kwargs):  # type: ignore[no-untyped-def]
        return args[0] if args else None

    def low_level(src: object) -> None:
        ds = src if hasattr(src, "file_meta") or hasattr(src, "SOPInstanceUID") else getattr(local, "ds", None)
        kind, uid = kind_of(ds) if ds is not None else ("unknown", "")
        local.inner = getattr(local, "inner", 0) + 1
        with lock:
            bump("decoder_calls", kind)
            if uid:
                instance(uid, kind)["decoder_calls"] += 1

    def patch_decoders(module: object) -> None:
        cls = module.Decoder  # type: ignore[attr-defined]
        as_array, iter_array = cls.as_array, cls.iter_array

        @functools.wraps(as_array)
        def counted_as_array(self, src, *args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                low_level(src)
            except Exception:  # noqa: BLE001
                pass
            return as_array(self, src, *args, **kwargs)

        @functools.wraps(iter_array)
        def counted_iter_array(self, src, *args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                low_level(src)
            except Exception:  # noqa: BLE001
                pass
            return iter_array(self, src, *args, **kwargs)

        cls.as_array, cls.iter_array = counted_as_array, counted_iter_array
        counts["hooks"].append("pydicom Decoder.as_array/iter_array")

    def patch_pixel_utils(module: object) -> None:
        module.pixel_array = outer_decode("pydicom.pixels.pixel_array", first_arg)(module.pixel_array)  # type: ignore[attr-defined]
        counts["hooks"].append("pydicom.pixels.utils.pixel_array")

    def patch_dataset(module: object) -> None:
        cls = module.Dataset  # type: ignore[attr-defined]
        cls.decompress = outer_decode("Dataset.decompress", self_arg)(cls.decompress)
        cls.convert_pixel_data = outer_decode("Dataset.convert_pixel_data", self_arg)(cls.convert_pixel_data)
        counts["hooks"].append("pydicom Dataset.decompress/convert_pixel_data")

    def patch_preprocess(module: object) -> None:
        if hasattr(module, "decode"):
            module.decode = outer_decode("inference.preprocess.decode", first_arg)(module.decode)  # type: ignore[attr-defined]
            counts["hooks"].append("inference.preprocess.decode")
        if hasattr(module, "decode_j2k_reduced"):
            original = module.decode_j2k_reduced  # type: ignore[attr-defined]

            @functools.wraps(original)
            def decode_j2k_reduced(*args, **kwargs):  # type: ignore[no-untyped-def]
                result = original(*args, **kwargs)
                if result is not None:
                    try:
                        low_level(None)
                    except Exception:  # noqa: BLE001
                        pass
                return result

            module.decode_j2k_reduced = decode_j2k_reduced  # type: ignore[attr-defined]
            counts["hooks"].append("inference.preprocess.decode_j2k_reduced")

    hooks = {
        "pydicom.filereader": patch_filereader,
        "pydicom.dataset": patch_dataset,
        "pydicom.pixels.utils": patch_pixel_utils,
        "pydicom.pixels.decoders.base": patch_decoders,
        "inference.preprocess": patch_preprocess,
    }

    class PostImportHook(importlib.abc.MetaPathFinder):
        """Lets the normal finders load a hooked module, then patches it before anyone uses it."""

        def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
            patch = hooks.get(fullname)
            if patch is None:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
            loader = spec.loader
            if loader is None or not hasattr(loader, "exec_module"):
                return spec
            exec_module = loader.exec_module

            def exec_and_patch(module):  # type: ignore[no-untyped-def]
                exec_module(module)
                try:
                    patch(module)
                except Exception as exc:  # noqa: BLE001
                    counts["hooks"].append(f"FAILED {fullname}: {exc!r}")

            loader.exec_module = exec_and_patch  # type: ignore[method-assign]
            return spec

    for name, patch in hooks.items():  # already imported (unusual this early): patch in place
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, PostImportHook())

    def write() -> None:
        with lock:
            snapshot = dict(counts)
            snapshot["modules"] = {
                name: getattr(sys.modules.get(name), "__file__", None)
                for name in ("gateway", "inference.preprocess", "pydicom")
            }
            snapshot["written_at"] = time.time()
            text = json.dumps(snapshot)
        os.makedirs(out_dir, exist_ok=True)
        final = os.path.join(out_dir, f"counts-{os.getpid()}.json")
        temporary = final + ".part"
        with open(temporary, "w") as handle:
            handle.write(text)
        os.replace(temporary, final)

    atexit.register(write)


_out = os.environ.get("PNEUMO_BENCH_COUNT_DIR")
if _out:
    try:
        _install(_out)
    except Exception as _exc:  # noqa: BLE001 - a broken counter must not stop the process
        print(f"bench work_counter: not installed: {_exc!r}", file=sys.stderr)
try:
    _chain_next_sitecustomize()
except Exception:  # noqa: BLE001
    pass
