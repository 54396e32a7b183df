"""The floor for a Python SCP: pynetdicom receiving straight to a file and moving it into place,
with no index, no fsync, no audit. Used by bench/ingest.py as a reference point."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts


def main() -> None:
    port, out, max_pdu = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(out)  # same file system, so the move is a rename

    def handle_store(event: evt.Event) -> int:
        os.replace(event.dataset_path, out / f"{event.request.AffectedSOPInstanceUID}.dcm")
        return 0x0000

    ae = AE("BARE")
    ae.maximum_pdu_size = max_pdu
    ae.maximum_associations = 16
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, handle_store)])


if __name__ == "__main__":
    main()
