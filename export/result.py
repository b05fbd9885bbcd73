"""What an exporter returns: the written artifact and the evidence that it is right."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from .validate import ValidationReport


@dataclasses.dataclass
class ExportResult:
    """One written step-graph artifact.

    Attributes:
        path: the written file.
        format: "onnx", "torchscript" or "torch-export".
        metadata: the ``lrnnx_zoo.*`` strings stored in the artifact.
        state_size, d_input, d_output, state_layout: the step contract (docs/export.md, "The step graph").
        validation: the float32 check of the written artifact (None if validate=False); for an
            int8 graph, of the float32 graph it was quantised from (its own check: ``quantization``).
        quantization: for int8 ONNX graphs: tolerance, output error, and the accuracy change on
            the checkpoint's evaluation split when it has one.
        graph: size in bytes, node count and per-op counts (ONNX), opset, exporter.
        warnings: upstream warnings recorded while exporting (e.g. TorchScript's deprecation).
    """

    path: str
    format: str
    metadata: Dict[str, str]
    state_size: int
    d_input: int
    d_output: int
    state_layout: List[List[Any]]
    validation: Optional[ValidationReport] = None
    quantization: Optional[Dict[str, Any]] = None
    graph: Dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: List[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """Every field as plain JSON-ready values, the validation report as its own dict (or None)."""
        d = dataclasses.asdict(self)
        d["validation"] = self.validation.to_dict() if self.validation is not None else None
        return d

    def summary(self) -> str:
        """A few human-readable lines: format, path, sizes, graph size, validation and int8 outcomes."""
        chunk = (self.metadata or {}).get("lrnnx_zoo.chunk")
        kind = f"chunk graph ({chunk} steps per call)" if chunk else "step graph"
        lines = [f"{self.format} {kind}: {self.path}",
                 f"  d_input={self.d_input} d_output={self.d_output} state_size={self.state_size}"]
        if self.graph:
            ops = self.graph.get("nodes")
            lines.append(f"  {self.graph.get('bytes', 0) / 1024:.1f} KiB" + (f", {ops} nodes" if ops else ""))
        if self.validation is not None:
            lines.append("  " + str(self.validation))
        if self.quantization:
            q = self.quantization
            lines.append(f"  int8: max abs output error {q['max_abs_error']:.3e} (tolerance {q['tolerance']:.3e})")
            if q.get("accuracy_float") is not None:
                lines.append(f"  int8: {q['metric']} float {q['accuracy_float']:.4f} -> int8 {q['accuracy_int8']:.4f} "
                             f"(change {q['accuracy_change']:+.4f})")
            if q.get("size_warning"):
                lines.append(f"  int8: warning: {q['size_warning']}")
        return "\n".join(lines)
