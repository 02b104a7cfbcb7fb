"""What the compose and Kubernetes checks share: the worker's settings, read
from its source (every `env = "NAME"` of the command line in src/), and
durations as the worker writes them (20s, 1m30s)."""
import pathlib
import re

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
SETTINGS = {m for f in SRC.rglob("*.rs") for m in re.findall(r'env = "([A-Z0-9_]+)"', f.read_text())}
# Read by libraries, or by prefix (src/configuration/kafka_properties.rs).
OTHERS = {"RUST_LOG", "RUST_BACKTRACE"}


def known_setting(name):
    return name in SETTINGS or name in OTHERS or name.startswith("KAFKA_PROPERTY_")


def seconds(duration):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)(ms|s|m|h)", str(duration))
    if not parts or "".join(n + u for n, u in parts) != str(duration):
        raise SystemExit(f"cannot read the duration {duration!r}")
    return sum(int(n) * units[u] for n, u in parts)
