"""The README's flag table is the server's real flag list."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from roberta_server.config import ServerConfig, env_name

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_server_flag_is_documented_with_its_environment_variable():
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(
            r"^\| `(--[a-z-]+)` \| `(ROBERTA_[A-Z_]+)` \|", README.read_text(), re.M
        )
    }
    flags = {
        "--" + f.name.replace("_", "-"): env_name(f.name) for f in dataclasses.fields(ServerConfig)
    }
    assert rows == flags
