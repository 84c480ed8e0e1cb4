"""Where the output goes: an existing OUT is replaced only with --force, and only by a directory."""

from __future__ import annotations

from safe_merge.io.staging import check_target

output_target = check_target
