"""The run folder as a contract: its layout, checkpoint files, JSON-lines logs and binding.

Training writes a run folder; evaluation, the report and the campaign read it. All of them take paths from
:class:`~knn_cm.runs.layout.RunLayout` and nothing else.
"""

from knn_cm.runs.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from knn_cm.runs.jsonl import JsonLinesLog, read_json_lines
from knn_cm.runs.layout import RunLayout, resolve_network_path

__all__ = ["JsonLinesLog", "RunLayout", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "read_json_lines", "resolve_network_path", "save_checkpoint"]
