"""The bundle: the folder that training writes and serving reads.

    <root>/manifest.json            schema version, student identity, experts, gate, compositions, and
                                    optionally the shared adapter (an expert on under every adapter route)
    <root>/experts/<name>/          PEFT LoRA folder (adapter_config.json, adapter_model.safetensors)
                                    plus an optional report.json
    <root>/gate/                    gate.safetensors + gate_config.json

Every file the manifest lists carries its sha256. Loading validates everything and raises
BundleError naming the file at fault; with strict=False a bad expert is reported in
`Bundle.problems` and skipped, and the gate or compositions that need it are dropped.
Writers change one part at a time, each atomically (folder first, then manifest.json);
one writer at a time per bundle.

schema.py: manifest records and their validation; reader.py: read_manifest, load_bundle and
file verification; writer.py: create_bundle, add_expert, set_gate, set_shared, add_composition.
"""

from mode_cotd.bundle.reader import Bundle, ExpertEntry, load_bundle, read_manifest, verify_folder
from mode_cotd.bundle.schema import (
    COMPOSITION_MODES,
    MANIFEST,
    REPORT,
    SCHEMA_VERSION,
    CompositionRecord,
    ExpertRecord,
    GateRecord,
    Manifest,
    StudentIdentity,
    resolve_inside,
    shared_in_linear,
)
from mode_cotd.bundle.writer import add_composition, add_expert, create_bundle, set_gate, set_shared

__all__ = [
    "COMPOSITION_MODES",
    "MANIFEST",
    "REPORT",
    "SCHEMA_VERSION",
    "Bundle",
    "CompositionRecord",
    "ExpertEntry",
    "ExpertRecord",
    "GateRecord",
    "Manifest",
    "StudentIdentity",
    "add_composition",
    "add_expert",
    "create_bundle",
    "load_bundle",
    "read_manifest",
    "resolve_inside",
    "set_gate",
    "set_shared",
    "shared_in_linear",
    "verify_folder",
]
