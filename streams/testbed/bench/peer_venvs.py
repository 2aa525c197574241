"""The peers' virtual environments for `streambill bench peers`: one per peer and pinned
version, made by the benchmark under ``$STREAMBILL_HOME/bench/venvs/<peer>-<version>``
with pip from PyPI, and reused while their marker says they were completed with the same
requirements. A peer never shares ours (Quix Streams pins an older confluent-kafka)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

# the Avro reader the peer scripts decode with: the version streambill itself uses
FASTAVRO = "fastavro==1.13.1"


@dataclass(frozen=True)
class Peer:
    name: str  # faust / quix: the prefix of its JSON figures
    title: str
    version: str
    requirements: tuple[str, ...]  # pip requirement specifiers, every top-level one pinned
    script: str  # beside this module, run by the venv's python

    @property
    def label(self) -> str:
        return f"{self.name}-{self.version}"


FAUST = Peer(
    "faust",
    "faust-streaming",
    "0.15.3",
    # RocksDB behind the Table, as faust's docs recommend for production (rocksdict, the
    # binding streambill and Quix Streams use too); cramjam: aiokafka's lz4 (its "lz4"
    # extra), to read the records, lz4-compressed as streambill produces them
    ("faust-streaming[rocksdict]==0.15.3", FASTAVRO, "cramjam==2.14.0"),
    "peer_faust.py",
)
QUIX = Peer(
    "quix",
    "Quix Streams",
    "3.28.1",
    ("quixstreams==3.28.1", FASTAVRO),
    "peer_quix.py",
)
PEERS = (FAUST, QUIX)
MARKER = "streambill-venv.txt"  # written last: the requirements the venv was made with


def venv_root(home: Path) -> Path:
    return home / "bench" / "venvs"


def venv_dir(home: Path, peer: Peer) -> Path:
    return venv_root(home) / peer.label


def venv_python(home: Path, peer: Peer) -> Path:
    return venv_dir(home, peer) / "bin" / "python"


def venv_ready(home: Path, peer: Peer) -> bool:
    marker = venv_dir(home, peer) / MARKER
    try:
        return marker.read_text().splitlines() == list(peer.requirements)
    except OSError:
        return False


def ensure_venv(home: Path, peer: Peer, console: Console) -> float:
    """The peer's venv, made if missing or incomplete; returns the seconds it took to make
    (0 when it was reused). pip's output goes to ``<venv>.log``."""
    if venv_ready(home, peer):
        return 0.0
    target = venv_dir(home, peer)
    log = target.with_name(f"{peer.label}.log")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(target)],
        [str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
         "--no-input", "--upgrade", "pip"],
        [str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
         "--no-input", *peer.requirements],
    ]  # fmt: skip
    with log.open("w") as out, console.status(f"[bold]{peer.title}[/]: making its venv") as st:
        for n, step in enumerate(steps, 1):
            st.update(f"[bold]{peer.title}[/]: making its venv ({n}/{len(steps)}: "
                      f"{' '.join(step[3:] if n > 1 else ['venv'])}), log in {log}")  # fmt: skip
            out.write(f"$ {' '.join(step)}\n")
            out.flush()
            done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"making the {peer.title} venv failed:\n{tail}")
    (target / MARKER).write_text("\n".join(peer.requirements) + "\n")
    seconds = time.perf_counter() - started
    console.print(f"{peer.title} {peer.version}: venv made in {seconds:.1f} s ({target})")
    return seconds


def peer_script(peer: Peer) -> Path:
    return Path(__file__).with_name(peer.script)
