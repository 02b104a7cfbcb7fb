#!/usr/bin/env python3
"""Checks the repository's Dockerfile and .dockerignore without building.

    python3 deploy/check_dockerfile.py

Parses the Dockerfile with the `dockerfile` package (BuildKit's own parser)
when it is installed, else line by line, and checks: a Rust bookworm builder
pinned to rust-toolchain.toml's channel (ARG RUST_VERSION, and the file
copied into the builder) and a debian:bookworm-slim runtime (the defaults
of the base-image build arguments; a digest, if any, well formed), the
runtime stage first and the image built FROM it; the OCI labels source,
revision, version and created, from build arguments scripts/images.sh
passes; every COPY from the build context names a
file that exists and that .dockerignore does not exclude; target/ and .git are
excluded; the binary built is Cargo.toml's [[bin]]; the runtime runs as a
numeric non-root user, exposes 9464, listens on 0.0.0.0:9464 and has
ENTRYPOINT ["allocation-worker"] and CMD ["run"] in exec form.

Exit status 1 with one line per problem.
"""
import fnmatch
import json
import pathlib
import re
import sys

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

ROOT = pathlib.Path(__file__).resolve().parent.parent
problems = []


def problem(message):
    problems.append(message)


def instructions(text):
    """(instruction, flags, value, is_json) for each instruction."""
    try:
        import dockerfile
    except ImportError:
        print("dockerfile-check: note: the `dockerfile` package is not installed, parsing line by line")
        joined = re.sub(r"\\\n", " ", text)
        result = []
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            flags = tuple(f for f in rest.split() if f.startswith("--"))
            rest = " ".join(w for w in rest.split() if not w.startswith("--"))
            is_json = rest.startswith("[")
            value = tuple(json.loads(rest)) if is_json else tuple(rest.split())
            result.append((word.upper(), flags, value, is_json))
        return result
    return [(c.cmd.upper(), c.flags, c.value, c.json) for c in dockerfile.parse_string(text)]


def ignored(path, patterns):
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            excluded = not negate
    return excluded


def main():
    dockerfile_path, ignore_path = ROOT / "Dockerfile", ROOT / ".dockerignore"
    if not dockerfile_path.is_file() or not ignore_path.is_file():
        print("dockerfile-check: Dockerfile or .dockerignore missing", file=sys.stderr)
        return 1
    patterns = [l.strip() for l in ignore_path.read_text().splitlines() if l.strip() and not l.startswith("#")]
    for must in ("target", ".git"):
        if not ignored(must, patterns):
            problem(f".dockerignore does not exclude {must}")

    parsed = instructions(dockerfile_path.read_text())
    stages = [i for i, (cmd, *_rest) in enumerate(parsed) if cmd == "FROM"]
    if len(stages) < 2:
        problem("not a multi-stage build")
        return report()
    # The base images are build arguments declared before the first FROM
    # (scripts/images.sh passes local stand-ins): check their defaults, which
    # are what users build on.
    global_args = {}
    for cmd, _flags, value, _json in parsed[: stages[0]]:
        if cmd == "ARG":
            for arg in value:
                name, _, default = arg.partition("=")
                global_args[name] = re.sub(
                    r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args.get(m[1] or m[2], ""), default
                )

    def resolved(text):
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args.get(m[1] or m[2], m[0]), text)

    # Stages by name (FROM <image> AS <name>): `runtime` is everything the
    # image has but the binary, `builder` compiles it, and the last stage is
    # `runtime` with the binary.
    named = {}
    for index in stages:
        words = parsed[index][2]
        if len(words) >= 3 and words[-2].upper() == "AS":
            named[words[-1]] = index
    for name in ("builder", "runtime"):
        if name not in named:
            problem(f"no stage named {name!r}")
    if problems:
        return report()
    builder_from = resolved(parsed[named["builder"]][2][0])
    runtime_from = resolved(parsed[named["runtime"]][2][0])
    last_from = parsed[stages[-1]][2]
    if last_from[0] != "runtime":
        problem(f"the last stage is FROM {' '.join(last_from)!r}, expected FROM runtime")
    if named["runtime"] != stages[0]:
        problem("the runtime stage is not the first: `--target runtime` would build the others too")
    # The builder's toolchain is rust-toolchain.toml's, and a base may be
    # pinned by digest (name:tag@sha256:<64 hex>), never by a malformed one.
    toolchain = ""
    if tomllib and (ROOT / "rust-toolchain.toml").is_file():
        toolchain = tomllib.loads((ROOT / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
    else:
        problem("no rust-toolchain.toml (or no tomllib to read it)")
    digest = r"(@sha256:[0-9a-f]{64})?"
    if global_args.get("RUST_VERSION") != toolchain:
        problem(f"ARG RUST_VERSION is {global_args.get('RUST_VERSION')!r}, rust-toolchain.toml says {toolchain!r}")
    if not re.fullmatch(rf"rust:{re.escape(toolchain)}-bookworm{digest}", builder_from):
        problem(f"builder stage is {builder_from!r}, expected rust:{toolchain}-bookworm[@sha256:...]")
    if not re.fullmatch(rf"debian:bookworm-slim{digest}", runtime_from.split()[0]):
        problem(f"runtime stage is {runtime_from!r}, expected debian:bookworm-slim[@sha256:...]")
    builder_end = next((i for i in stages if i > named["builder"]), len(parsed))
    if not any(cmd == "COPY" and "rust-toolchain.toml" in value[:-1]
               for cmd, _flags, value, _json in parsed[named["builder"]:builder_end]):
        problem("the builder stage does not COPY rust-toolchain.toml")

    for cmd, flags, value, _ in parsed:
        if cmd == "COPY" and not any(f.startswith("--from") for f in flags):
            for source in value[:-1]:
                if not (ROOT / source).exists():
                    problem(f"COPY {source}: not in the repository")
                elif ignored(source.rstrip("/"), patterns):
                    problem(f"COPY {source}: excluded by .dockerignore")

    if tomllib:
        cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
        binaries = [b["name"] for b in cargo.get("bin", [])] or [cargo["package"]["name"]]
        text = dockerfile_path.read_text()
        for binary in binaries:
            if f"target/release/{binary}" not in text:
                problem(f"the Dockerfile does not install target/release/{binary}")

    # What the image gets: the runtime stage, then the last stage over it.
    runtime_end = next((i for i in stages if i > named["runtime"]), len(parsed))
    runtime = parsed[named["runtime"] : runtime_end] + parsed[stages[-1] :]
    last = {}
    env = {}
    for cmd, _, value, is_json in runtime:
        last[cmd] = (value, is_json)
        if cmd == "ENV":
            items = list(value)
            if len(items) == 2 and "=" not in items[0]:
                env[items[0]] = items[1]
            else:
                for item in items:
                    key, _, val = item.partition("=")
                    env[key] = val
    user = (last.get("USER") or ((),))[0]
    user = user[0] if user else ""
    if not re.fullmatch(r"[1-9]\d*(:\d+)?", user):
        problem(f"runtime USER is {user!r}: expected a numeric non-root uid (Kubernetes runAsNonRoot)")
    if "9464" not in " ".join((last.get("EXPOSE") or ((),))[0]):
        problem("runtime does not EXPOSE 9464")
    if env.get("HTTP_ADDR") != "0.0.0.0:9464":
        problem("runtime does not set HTTP_ADDR=0.0.0.0:9464")
    if last.get("ENTRYPOINT") != (("allocation-worker",), True):
        problem(f"ENTRYPOINT is {last.get('ENTRYPOINT')}, expected exec form [\"allocation-worker\"]")
    if last.get("CMD") != (("run",), True):
        problem(f"CMD is {last.get('CMD')}, expected exec form [\"run\"]")
    # OCI labels, each from a build argument of the same name that
    # scripts/images.sh passes (git and Cargo.toml fill them).
    labels = {}
    for cmd, _flags, value, _json in runtime:
        if cmd == "LABEL":
            labels.update(zip(value[::2], (v.strip('"') for v in value[1::2])))
    stage_args = {v.partition("=")[0] for cmd, _f, values, _j in runtime if cmd == "ARG" for v in values}
    images_sh = (ROOT / "scripts" / "images.sh").read_text()
    for key, arg in (("source", "SOURCE"), ("revision", "REVISION"), ("version", "VERSION"), ("created", "CREATED")):
        if labels.get(f"org.opencontainers.image.{key}") != f"${{{arg}}}" or arg not in stage_args:
            problem(f"runtime has no LABEL org.opencontainers.image.{key}=\"${{{arg}}}\" from ARG {arg}")
        if f'"{arg}=' not in images_sh:
            problem(f"scripts/images.sh does not pass --build-arg {arg}")
    return report(len(parsed), len(stages))


def report(count=0, stages=0):
    for line in problems:
        print(f"dockerfile-check: {line}", file=sys.stderr)
    if problems:
        print(f"dockerfile-check: FAILED ({len(problems)} problems)")
        return 1
    print(f"dockerfile-check: {count} instructions in {stages} stages: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
