"""eager: the rank graph saved with torch.export.save (weights left out: they are meta) and run as is."""
from pathlib import Path

import torch
from torch.export import ExportedProgram

from tpcompile.capture import retarget_device

ENGINE = "engine.pt2"


def lower(program: ExportedProgram, out_dir: Path) -> list[str]:
    torch.export.save(program, out_dir / ENGINE)
    return [ENGINE]


def load(out_dir: Path, files: list[str], weights: dict, device) -> torch.nn.Module:
    return bind(out_dir / ENGINE, weights, device)


def bind(path: Path, weights: dict, device) -> torch.nn.Module:
    """The saved rank graph as a module holding this rank's weights on `device`."""
    gm = torch.export.load(path).module()
    retarget_device(gm, str(device))
    missing = sorted(set(gm.state_dict()) - set(weights))
    if missing:
        raise ValueError(f"{path}: weights missing for {missing[:3]} ({len(missing)} in all); recompile the artifact")
    gm.load_state_dict(weights, strict=False, assign=True)
    return gm
