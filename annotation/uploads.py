"""An upload handler that stops storing a file once it passes ``IMPORT_MAX_BYTES``.

Django writes uploads to memory or a temporary file before any view runs, and counts only
non-file fields against ``DATA_UPLOAD_MAX_MEMORY_SIZE``. Without this handler a multi-gigabyte
upload would fill the disk before the import could refuse it. The rest of the file is read
and dropped (``SkipFile``), so fields after it, such as the CSRF token, still arrive; the view
sees no file and ``request.upload_too_large`` set.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, SkipFile


class CappedUploadHandler(FileUploadHandler):
    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        if start + len(raw_data) > settings.IMPORT_MAX_BYTES:
            if self.request is not None:
                self.request.upload_too_large = True  # type: ignore[attr-defined]
            raise SkipFile()
        return raw_data

    def file_complete(self, file_size: int) -> Any:
        return None  # the next handler stores the file
