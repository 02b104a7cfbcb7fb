#!/usr/bin/env python3
"""What hadolint cannot know about the Dockerfile: the files beside it.

    python3 deploy/check_dockerfile.py

- ARG RUST_VERSION is rust-toolchain.toml's channel;
- every COPY from the build context names a file that exists and that
  .dockerignore leaves in (CI builds only the runtime stage, so a builder
  stage that copies a missing file would go unseen until a user builds);
- the last USER is numeric (Kubernetes' runAsNonRoot can only verify a uid);
- scripts/images.sh passes the build arguments of the OCI labels.

deploy/check.sh runs it after hadolint. One line per problem, exit status 1.
"""
import fnmatch
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
lines = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
ignore = [p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
problems = []
channel = tomllib.loads((ROOT / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
if f"RUST_VERSION={channel}" not in [w for line in lines if line[0] == "ARG" for w in line[1:]]:
    problems.append(f"ARG RUST_VERSION is not {channel}, the channel of rust-toolchain.toml")
for line in lines:
    if line[0] == "COPY" and not any(w.startswith("--from") for w in line):
        for source in [w for w in line[1:-1] if not w.startswith("--")]:
            if not (ROOT / source).exists():
                problems.append(f"COPY {source}: no such file in the repository")
            elif any(fnmatch.fnmatch(source.rstrip("/"), p) for p in ignore):
                problems.append(f"COPY {source}: excluded by .dockerignore")
users = [line[1] for line in lines if line[0] == "USER"]
if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
    problems.append(f"the last USER is {users[-1] if users else 'unset'}, not a numeric non-root uid")
images_sh = (ROOT / "scripts/images.sh").read_text()
for arg in ("SOURCE", "REVISION", "VERSION", "CREATED"):
    if f'"{arg}=' not in images_sh:
        problems.append(f"scripts/images.sh does not pass --build-arg {arg} (an OCI label of the Dockerfile)")
for problem in problems:
    print(f"dockerfile-check: Dockerfile: {problem}", file=sys.stderr)
print(f"dockerfile-check: FAILED ({len(problems)} problems)" if problems else "dockerfile-check: ok")
sys.exit(1 if problems else 0)
