"""Container images for the real node, built here without a registry or a container engine.

Why: the real-runtime tests run what users run, the plugin's image from
``deploy/container/Dockerfile``, plus the two images a node needs besides it: the pod sandbox's
``pause`` and a tiny workload image. No registry can be reached and no image builder is
installed, so this module writes OCI image archives itself (layers as tar.gz, config and manifest
JSON, ``index.json``) for ``ctr -n k8s.io images import``.

- ``pause``: the static pause binary ``tests/peers/build.sh pause`` builds from Kubernetes' pause.c.
- ``busybox``: Debian's ``busybox-static`` (downloaded with ``apt-get download``, never installed),
  one binary and its applet links.
- the plugin: the Dockerfile itself, executed by :class:`DockerfileBuild` (FROM, ARG, ENV, COPY,
  RUN, LABEL, USER, ENTRYPOINT, CMD; anything else is refused, so the recipe cannot drift from
  what is built here). Its FROM image (``python:3.11-slim-bookworm``) cannot be pulled, so the
  base is Debian bookworm ``minbase`` plus python3 from Debian's packages, made by ``mmdebstrap``
  unpacked from its .deb; the builder checks that the base's Python is the one the FROM tag names.
  Each stage is an overlay over the base; RUN executes in a private mount namespace (chroot with
  its own /proc and a minimal /dev), so nothing reaches the host; the final stage's upper dir is
  the image's one layer over the base.

Everything is cached under ``~/.cache/gpu-dra/images`` by a key of its inputs (the base by its
package list, the plugin image by the Dockerfile, the wheel's contents and the base); a warm call
only returns paths.

Usage (by hand): ``python -m tests.ground.images all OUTDIR`` writes the three archives.

What it does not do: push, pull, sign, build for other architectures, or preserve xattrs/file
capabilities in layers (none of these images has any).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import structlog

from tests.ground import peers
from tests.ground.wheel import build_wheel

log = structlog.get_logger(__name__)

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "container" / "Dockerfile"
#: Bumped when this module changes what it writes (part of every cache key).
BUILDER_VERSION = "1"

PAUSE_REF = "registry.k8s.io/pause"
BUSYBOX_REF = "gpu-dra.local/busybox:1.35"
PLUGIN_REPOSITORY = "gpu-dra.local/gpu-dra"

#: The Debian stand-in for each FROM image the Dockerfile may name: suite, packages, python version.
#: python:3.11-slim-bookworm is Debian bookworm with CPython 3.11 and ``python`` on PATH.
BASES: Mapping[str, dict[str, Any]] = {
    "python:3.11-slim-bookworm": {
        "suite": "bookworm",
        "include": ["python3", "python3-venv", "python-is-python3"],
        "python": "3.11",
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
        "cmd": ["python3"],
    },
}
DEBIAN_MIRRORS = (
    "deb http://deb.debian.org/debian {suite} main",
    "deb http://deb.debian.org/debian {suite}-updates main",
    "deb http://deb.debian.org/debian-security {suite}-security main",
)
#: Like the slim python images: no docs, man pages or translations.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


class ImageBuildError(RuntimeError):
    """An image could not be built; the message names the step and what to fix."""


def cache_root() -> Path:
    """Where images and their inputs are cached (``GPU_DRA_IMAGES_CACHE`` overrides)."""
    env = os.environ.get("GPU_DRA_IMAGES_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpu-dra" / "images"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([BUILDER_VERSION, *parts], sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per cache entry across processes (concurrent test sessions wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _run(argv: Sequence[str], what: str, **kwargs: Any) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}): {shlex.join(argv)}\n{tail}")
    return str(proc.stdout)


# -- layers and archives -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
    """A gzip'd layer tar: ``digest`` of the blob, ``diff_id`` of the uncompressed tar."""

    path: Path
    digest: str
    diff_id: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "digest": self.digest, "diff_id": self.diff_id, "size": self.size}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Layer:
        return cls(Path(d["path"]), str(d["digest"]), str(d["diff_id"]), int(d["size"]))


class _Hashing:
    """A write-through file object that hashes and counts what passes."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def write_layer(root: Path, out: Path, *, overlay_upper: bool = False) -> Layer:
    """Tar ``root``'s tree (sorted, numeric owners, mtimes kept) into ``out`` as tar.gz.

    ``overlay_upper``: ``root`` is an overlayfs upper dir, so its whiteouts (0/0 character devices)
    and opaque directories become OCI whiteout entries (``.wh.<name>``, ``.wh..wh..opq``).
    """
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as raw:
        blob = _Hashing(raw)
        with gzip.GzipFile(fileobj=blob, mode="wb", mtime=0, compresslevel=6) as gz:
            plain = _Hashing(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for path in _walk(root):
                    rel = path.relative_to(root).as_posix()
                    st = path.lstat()
                    if overlay_upper and _is_whiteout(st):
                        parent, _, name = rel.rpartition("/")
                        info = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
                        info.mtime = int(st.st_mtime)
                        tar.addfile(info)
                        continue
                    info = tar.gettarinfo(str(path), arcname=rel)
                    info.uname = info.gname = ""
                    if info.isreg():
                        with path.open("rb") as fh:
                            tar.addfile(info, fh)
                    else:
                        tar.addfile(info)
                    if overlay_upper and info.isdir() and _is_opaque(path):
                        opq = tarfile.TarInfo(f"{rel}/.wh..wh..opq")
                        opq.mtime = int(st.st_mtime)
                        tar.addfile(opq)
    tmp.replace(out)
    return Layer(out, f"sha256:{blob.sha.hexdigest()}", f"sha256:{plain.sha.hexdigest()}", blob.size)


def _walk(root: Path) -> Iterator[Path]:
    """Every path under ``root`` (not root itself), parents before children, names sorted."""
    for path in sorted(root.iterdir()):
        yield path
        if path.is_dir() and not path.is_symlink():
            yield from _walk(path)


def _write_json_blob(blobs: Path, obj: Mapping[str, Any]) -> tuple[str, int]:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """The runnable part of an OCI image config."""

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    user: str = ""
    working_dir: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Env": list(self.env)}
        if self.entrypoint is not None:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            out["Cmd"] = list(self.cmd)
        if self.user:
            out["User"] = self.user
        if self.working_dir:
            out["WorkingDir"] = self.working_dir
        if self.labels:
            out["Labels"] = dict(self.labels)
        return out


def write_oci_archive(out: Path, ref: str, layers: Sequence[Layer], config: ImageConfig) -> str:
    """Write an OCI image layout tar naming ``ref``; return the manifest digest."""
    with tempfile.TemporaryDirectory(prefix="oci-", dir=out.parent) as tmp:
        layout = Path(tmp)
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for layer in layers:
            os.link(layer.path, blobs / layer.digest.removeprefix("sha256:"))
        cfg = {
            "architecture": "amd64",
            "os": "linux",
            "config": config.to_json(),
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created_by": "gpu-dra tests/ground/images.py"} for _ in layers],
        }
        cfg_digest, cfg_size = _write_json_blob(blobs, cfg)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": cfg_size},
            "layers": [{"mediaType": OCI_LAYER, "digest": lay.digest, "size": lay.size} for lay in layers],
        }
        man_digest, man_size = _write_json_blob(blobs, manifest)
        tag = ref.rpartition(":")[2]
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": man_digest,
                    "size": man_size,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
        (layout / "index.json").write_text(json.dumps(index, sort_keys=True))
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        tmp_out = out.with_name(out.name + ".tmp")
        with tarfile.open(tmp_out, "w") as tar:
            for path in [layout / "oci-layout", layout / "index.json", *_walk(layout / "blobs")]:
                tar.add(path, arcname=path.relative_to(layout).as_posix(), recursive=False)
        tmp_out.replace(out)
    return man_digest


@dataclasses.dataclass(frozen=True)
class Image:
    """A built image archive and the reference it imports as."""

    ref: str
    archive: Path
    manifest_digest: str


def _cached_image(name: str, key: str) -> tuple[Path, Image | None]:
    d = cache_root() / f"{name}-{key}"
    meta = d / "image.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        img = Image(m["ref"], Path(m["archive"]), m["manifest_digest"])
        if img.archive.is_file():
            return d, img
    return d, None


def _store_image(d: Path, ref: str, layers: Sequence[Layer], config: ImageConfig) -> Image:
    archive = d / "image.tar"
    digest = write_oci_archive(archive, ref, layers, config)
    img = Image(ref, archive, digest)
    tmp = d / "image.json.tmp"
    tmp.write_text(json.dumps({"ref": ref, "archive": str(archive), "manifest_digest": digest}))
    tmp.replace(d / "image.json")
    return img


# -- pause and busybox -------------------------------------------------------------------------


def pause_image() -> Image:
    """The pod sandbox image, named as the kubelet and containerd expect it (registry.k8s.io/pause:TAG)."""
    pause_dir = peers.pause_dir()
    tag = (pause_dir / "TAG").read_text().strip()
    binary = pause_dir / "bin" / "pause"
    key = _key("pause", tag, hashlib.sha256(binary.read_bytes()).hexdigest())
    d, img = _cached_image("pause", key)
    if img:
        return img
    with _locked(d):
        d, img = _cached_image("pause", key)
        if img:
            return img
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            root = Path(tmp) / "rootfs"
            root.mkdir()
            shutil.copy2(binary, root / "pause")
            layer = write_layer(root, d / "layer.tar.gz")
        config = ImageConfig(entrypoint=("/pause",), user="65535:65535")
        return _store_image(d, f"{PAUSE_REF}:{tag}", [layer], config)


def _debs(dest: Path, *packages: str) -> Path:
    """Download ``packages`` (the host's apt sources; nothing installed) and unpack them under dest/root."""
    debs = dest / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", "-q", *packages], f"apt-get download {' '.join(packages)}", cwd=debs)
    root = dest / "root"
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
    return root


def busybox_image() -> Image:
    """A ~1 MB workload image: Debian's busybox-static, ``sh``/``ls``/``env``/``sleep``... as applet links."""
    key = _key("busybox", "busybox-static")
    d, img = _cached_image("busybox", key)
    if img:
        return img
    with _locked(d):
        d, img = _cached_image("busybox", key)
        if img:
            return img
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            unpacked = _debs(Path(tmp), "busybox-static")
            root = Path(tmp) / "rootfs"
            for sub in ("bin", "tmp", "etc", "dev", "proc", "sys"):
                (root / sub).mkdir(parents=True)
            (root / "tmp").chmod(0o1777)
            shutil.copy2(unpacked / "bin" / "busybox", root / "bin" / "busybox")
            applets = _run([str(root / "bin" / "busybox"), "--list"], "busybox --list").split()
            for applet in applets:
                if applet != "busybox" and re.fullmatch(r"[a-z0-9._\[-]+", applet):
                    (root / "bin" / applet).symlink_to("busybox")
            (root / "etc" / "passwd").write_text(
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
            )
            (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
            layer = write_layer(root, d / "layer.tar.gz")
        config = ImageConfig(env=("PATH=/bin",), cmd=("sh",))
        return _store_image(d, BUSYBOX_REF, [layer], config)


# -- the base (FROM) image -----------------------------------------------------------------------


def _mmdebstrap() -> Path:
    """mmdebstrap unpacked from Debian's .deb under the cache (it is a perl script using the host's apt)."""
    d = cache_root() / "tools" / "mmdebstrap"
    exe = d / "root" / "usr" / "bin" / "mmdebstrap"
    with _locked(d):
        if not exe.is_file():
            shutil.rmtree(d, ignore_errors=True)
            _debs(d, "mmdebstrap")
    return exe


@dataclasses.dataclass(frozen=True)
class Base:
    """A locally built FROM image: its rootfs (an overlay lower dir), layer and config."""

    name: str
    rootfs: Path
    layer: Layer
    config: ImageConfig


def base_image(name: str) -> Base:
    """The Debian stand-in for the FROM image ``name`` (see :data:`BASES`)."""
    spec = BASES.get(name)
    if spec is None:
        raise ImageBuildError(
            f"the Dockerfile's base image {name!r} has no local stand-in; add it to BASES in {__file__}"
        )
    key = _key("base", name, spec, DEBIAN_MIRRORS, DPKG_EXCLUDES)
    d = cache_root() / f"base-{key}"
    meta = d / "base.json"
    config = ImageConfig(env=tuple(spec["env"]), cmd=tuple(spec["cmd"]))
    with _locked(d):
        if not meta.is_file():
            _build_base(d, spec)
            layer = write_layer(d / "rootfs", d / "layer.tar.gz")
            tmp = d / "base.json.tmp"
            tmp.write_text(json.dumps({"layer": layer.to_json()}))
            tmp.replace(meta)
        layer = Layer.from_json(json.loads(meta.read_text())["layer"])
    return Base(name, d / "rootfs", layer, config)


def _build_base(d: Path, spec: Mapping[str, Any]) -> None:
    mmdebstrap = _mmdebstrap()
    rootfs = d / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    d.mkdir(parents=True, exist_ok=True)
    suite = spec["suite"]
    argv = [
        "perl",
        str(mmdebstrap),
        "--mode=root",
        "--variant=minbase",
        "--quiet",
        f"--include={','.join(spec['include'])}",
        *(f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES),
        suite,
        str(rootfs),
        *(m.format(suite=suite) for m in DEBIAN_MIRRORS),
    ]
    log.info("building base image", suite=suite, include=spec["include"])
    # A private mount namespace: mmdebstrap mounts /proc, /sys and /dev inside the target; those
    # mounts end with the namespace even if it is killed.
    # Its helpers (mmtarfilter) sit beside it in the unpacked package.
    env = {**os.environ, "PATH": f"{mmdebstrap.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    _run(["unshare", "--mount", "--propagation", "private", "--", *argv], "mmdebstrap (base image)", env=env)
    version = _run(
        ["chroot", str(rootfs), "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        "python3 --version in the base image",
    ).strip()
    if version != spec["python"]:
        raise ImageBuildError(
            f"the stand-in base gives Python {version}, the Dockerfile's FROM names {spec['python']}; "
            "change BASES in tests/ground/images.py"
        )
    # Like Docker's rootfs: no machine-id or host resolver config baked in.
    for leftover in ("etc/machine-id", "etc/resolv.conf", "etc/hostname"):
        with contextlib.suppress(FileNotFoundError):
            (rootfs / leftover).unlink()


# -- the Dockerfile ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _expand(text: str, env: Mapping[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m[1] or m[2], ""), text)


def _env_pairs(args: str) -> list[tuple[str, str]]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy form: ENV KEY value with spaces
        return [(words[0], " ".join(words[1:]))]
    return [tuple(w.split("=", 1)) for w in words]  # type: ignore[misc]


@dataclasses.dataclass
class Stage:
    """One FROM ... stage as the build runs it."""

    index: int
    name: str
    base: str
    env: dict[str, str]
    steps: list[dict[str, Any]]
    user: str = ""
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


#: Instructions the build understands; any other one in the Dockerfile is an error.
SUPPORTED = ("ARG", "FROM", "ENV", "COPY", "RUN", "LABEL", "USER", "ENTRYPOINT", "CMD")


def plan(text: str, base_env: Mapping[str, Mapping[str, str]] | None = None) -> list[Stage]:
    """The stages of the Dockerfile ``text``, with ARGs and ENVs expanded; RUN/COPY as steps.

    ``base_env``: the environment each FROM image brings (by image name), so ``$PATH`` expands as
    it would on that image.
    """
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in parse_dockerfile(text):
        if ins.keyword not in SUPPORTED:
            raise ImageBuildError(
                f"{DOCKERFILE.name}:{ins.line}: {ins.keyword} is not supported by tests/ground/images.py; "
                "teach the local build that instruction so the recipe stays one"
            )
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            if stages:
                stages[-1].env.setdefault(name, default)
            else:
                args[name] = default
            continue
        if ins.keyword == "FROM":
            words = _expand(ins.args, args).split()
            image = words[0]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            inherited = next((s for s in stages if s.name == image), None)
            env = dict(inherited.env if inherited else (base_env or {}).get(image, {}))
            stages.append(Stage(len(stages), name, image, env, []))
            continue
        if not stages:
            raise ImageBuildError(f"{DOCKERFILE.name}:{ins.line}: {ins.keyword} before FROM")
        st = stages[-1]
        if ins.keyword == "ENV":
            for k, v in _env_pairs(ins.args):
                st.env[k] = _expand(v, st.env)
        elif ins.keyword == "LABEL":
            for k, v in _env_pairs(ins.args):
                st.labels[k] = v
        elif ins.keyword == "USER":
            st.user = _expand(ins.args, st.env)
        elif ins.keyword == "ENTRYPOINT":
            st.entrypoint = tuple(json.loads(ins.args))
        elif ins.keyword == "CMD":
            st.cmd = tuple(json.loads(ins.args))
        elif ins.keyword == "RUN":
            st.steps.append({"op": "RUN", "cmd": ins.args, "env": dict(st.env), "user": st.user})
        elif ins.keyword == "COPY":
            words = shlex.split(ins.args)
            source = None
            if words[0].startswith("--from="):
                source = words.pop(0).split("=", 1)[1]
            if any(w.startswith("--") for w in words):
                raise ImageBuildError(
                    f"{DOCKERFILE.name}:{ins.line}: COPY flags other than --from are not supported"
                )
            st.steps.append({"op": "COPY", "from": source, "src": words[:-1], "dest": words[-1]})
    return stages


class DockerfileBuild:
    """Runs :func:`plan`'s stages on overlays over the local base; the last stage becomes the image."""

    def __init__(self, dockerfile: Path, context: Path, workdir: Path) -> None:
        self.text = dockerfile.read_text()
        self.context = context
        self.workdir = workdir

    def bases(self) -> dict[str, Base]:
        """The local stand-in of every FROM image that is not an earlier stage."""
        stages = plan(self.text)
        names = {s.name for s in stages}
        return {s.base: base_image(s.base) for s in stages if s.base not in names}

    def build(
        self, ref: str, extra_labels: Mapping[str, str] | None = None
    ) -> tuple[Path, Layer, Base, Stage]:
        bases = self.bases()
        env = {name: dict(kv.split("=", 1) for kv in b.config.env) for name, b in bases.items()}
        stages = plan(self.text, env)
        final = stages[-1]
        base = bases.get(final.base)
        if base is None:
            raise ImageBuildError(f"the final stage must start FROM a base image, not stage {final.base!r}")
        spec = {
            "context": str(self.context),
            "workdir": str(self.workdir),
            "stages": [
                {
                    "name": s.name,
                    "lower": str(bases[s.base].rootfs) if s.base in bases else None,
                    "parent": s.base if s.base not in bases else None,
                    "steps": s.steps,
                }
                for s in stages
            ],
        }
        spec_file = self.workdir / "stages.json"
        spec_file.write_text(json.dumps(spec))
        log.info("running the Dockerfile", stages=[s.name for s in stages], ref=ref)
        _run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                sys.executable,
                "-m",
                "tests.ground.images",
                "_stages",
                str(spec_file),
            ],
            f"building {ref} from {DOCKERFILE.relative_to(REPO)}",
            cwd=REPO,
        )
        upper = self.workdir / final.name / "upper"
        layer = write_layer(upper, self.workdir / "layer.tar.gz", overlay_upper=True)
        labels = {**final.labels, **(extra_labels or {})}
        final.labels = labels
        return upper, layer, base, final


def _run_stages(spec_file: Path) -> None:
    """In a private mount namespace (see :meth:`DockerfileBuild.build`): mount, run, unmount."""
    spec = json.loads(spec_file.read_text())
    context = Path(spec["context"])
    work = Path(spec["workdir"])
    merged_of: dict[str, Path] = {}
    for stage in spec["stages"]:
        sdir = work / stage["name"]
        upper, wd, merged = sdir / "upper", sdir / "work", sdir / "merged"
        for p in (upper, wd, merged):
            p.mkdir(parents=True)
        lower = stage["lower"]
        if lower is None:  # FROM an earlier stage: its merged view is this stage's lower
            lower = str(merged_of[stage["parent"]])
        _mount(
            [
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower},upperdir={upper},workdir={wd},index=off,metacopy=off,redirect_dir=off",
                str(merged),
            ]
        )
        merged_of[stage["name"]] = merged
        for step in stage["steps"]:
            if step["op"] == "COPY":
                src_root = context if step["from"] is None else merged_of[step["from"]]
                _copy(src_root, step["src"], merged, step["dest"])
            else:
                _chroot_run(merged, step["cmd"], step["env"], step["user"])


def _mount(args: list[str]) -> None:
    _run(["mount", *args], f"mount {' '.join(args)}")


def _copy(src_root: Path, sources: list[str], merged: Path, dest: str) -> None:
    target = merged / dest.lstrip("/")
    matches: list[Path] = []
    for src in sources:
        found = sorted(src_root.glob(src.lstrip("/")))
        if not found:
            raise ImageBuildError(f"COPY {src}: nothing matches in {src_root}")
        matches += found
    if dest.endswith("/") or len(matches) > 1:
        target.mkdir(parents=True, exist_ok=True)
    for m in matches:
        if m.is_dir():
            shutil.copytree(m, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(m, target / m.name if target.is_dir() else target)


def _chroot_run(merged: Path, cmd: str, env: Mapping[str, str], user: str) -> None:
    """``/bin/sh -c cmd`` in the stage's root with /proc, a minimal /dev and the host's resolver."""
    (merged / "proc").mkdir(exist_ok=True)
    (merged / "dev").mkdir(exist_ok=True)
    _mount(["-t", "proc", "proc", str(merged / "proc")])
    _mount(["-t", "tmpfs", "-o", "mode=755,size=1m", "tmpfs", str(merged / "dev")])
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        (merged / "dev" / node).touch()
        _mount(["--bind", f"/dev/{node}", str(merged / "dev" / node)])
    resolv = merged / "etc" / "resolv.conf"
    created = not resolv.exists()
    if created:
        resolv.touch()
    _mount(["--bind", "-o", "ro", "/etc/resolv.conf", str(resolv)])
    mounts = ["etc/resolv.conf", *(f"dev/{n}" for n in ("null", "zero", "full", "random", "urandom", "tty"))]
    mounts += ["dev", "proc"]
    run_env = {"HOME": "/root", **env, **_build_network(merged, mounts)}
    try:
        argv = ["chroot"]
        if user:
            argv.append(f"--userspec={user}")
        argv += [str(merged), "/bin/sh", "-c", cmd]
        _run(argv, f"RUN {cmd}", env=run_env)
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(merged / m)], check=False, capture_output=True)
        if created:
            resolv.unlink()


#: Proxy settings a build passes through, as Docker does with its predefined build args.
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
_CA_VARS = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


def _build_network(merged: Path, mounts: list[str]) -> dict[str, str]:
    """The host's way out for RUN steps, leaving nothing in the image.

    Where the host reaches PyPI through a TLS-intercepting proxy, its CA bundle (PIP_CERT,
    REQUESTS_CA_BUNDLE or SSL_CERT_FILE) is bind-mounted read-only on a tmpfs at /run/build and
    named by PIP_CERT; proxy variables pass through. The tmpfs and the bind are unmounted after
    the step, so the layer holds neither.
    """
    env = {k: os.environ[k] for k in _PROXY_VARS if k in os.environ}
    ca = next((os.environ[k] for k in _CA_VARS if os.environ.get(k) and Path(os.environ[k]).is_file()), None)
    if ca is None:
        return env
    run = merged / "run"
    run.mkdir(exist_ok=True)
    _mount(["-t", "tmpfs", "-o", "mode=755,size=1m", "tmpfs", str(run)])
    (run / "build").mkdir()
    (run / "build" / "ca.crt").touch()
    _mount(["--bind", "-o", "ro", ca, str(run / "build" / "ca.crt")])
    mounts[:0] = ["run/build/ca.crt", "run"]
    env["PIP_CERT"] = "/run/build/ca.crt"
    return env


def _wheel_fingerprint(wheel: Path) -> str:
    """Hash of the wheel's file names and contents (zip timestamps differ between checkouts)."""
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            h.update(name.encode())
            h.update(hashlib.sha256(zf.read(name)).digest())
    return h.hexdigest()


def plugin_image(tag: str = "test", extra_labels: Mapping[str, str] | None = None) -> Image:
    """The plugin's image from deploy/container/Dockerfile and the wheel of this tree, as ``ref``.

    Images with other tags or labels share the built layers (one Dockerfile run per input).
    """
    ref = f"{PLUGIN_REPOSITORY}:{tag}"
    work_root = cache_root() / "plugin-work"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root) as tmp:
        wheel = build_wheel(Path(tmp))
        text = DOCKERFILE.read_text()
        bases = {n: _key("base", n, BASES[n], DEBIAN_MIRRORS, DPKG_EXCLUDES) for n in BASES}
        layers_key = _key("plugin", text, _wheel_fingerprint(wheel), bases)
        layers_dir = cache_root() / f"plugin-{layers_key}"
        with _locked(layers_dir):
            meta = layers_dir / "build.json"
            if not meta.is_file():
                if layers_dir.exists():
                    shutil.rmtree(layers_dir)
                layers_dir.mkdir(parents=True)
                context = Path(tmp) / "context"
                (context / "dist").mkdir(parents=True)
                shutil.copy2(wheel, context / "dist" / wheel.name)
                work = Path(tmp) / "build"
                work.mkdir()
                _, layer, base, final = DockerfileBuild(DOCKERFILE, context, work).build(ref)
                kept = layers_dir / "layer.tar.gz"
                shutil.move(layer.path, kept)
                layer = dataclasses.replace(layer, path=kept)
                record = {
                    "base": base.name,
                    "base_layer": base.layer.to_json(),
                    "layer": layer.to_json(),
                    "env": [f"{k}={v}" for k, v in final.env.items() if k not in _build_args(text)],
                    "entrypoint": final.entrypoint,
                    "cmd": final.cmd,
                    "user": final.user,
                    "labels": final.labels,
                }
                tmp_meta = layers_dir / "build.json.tmp"
                tmp_meta.write_text(json.dumps(record))
                tmp_meta.replace(meta)
                _prune_plugin_builds(layers_dir)
            record = json.loads(meta.read_text())
    config = ImageConfig(
        env=tuple(record["env"]),
        entrypoint=tuple(record["entrypoint"]) if record["entrypoint"] is not None else None,
        cmd=tuple(record["cmd"]) if record["cmd"] is not None else None,
        user=record["user"],
        labels=tuple(sorted({**record["labels"], **(extra_labels or {})}.items())),
    )
    layers = [Layer.from_json(record["base_layer"]), Layer.from_json(record["layer"])]
    variant = _key(ref, config.to_json())
    d = layers_dir / f"image-{variant}"
    with _locked(d):
        meta_img = d / "image.json"
        if meta_img.is_file():
            m = json.loads(meta_img.read_text())
            if Path(m["archive"]).is_file():
                return Image(m["ref"], Path(m["archive"]), m["manifest_digest"])
        d.mkdir(parents=True, exist_ok=True)
        return _store_image(d, ref, layers, config)


#: Plugin builds kept in the cache (each wheel change makes a new one of ~40 MB plus ~100 MB per tag).
KEEP_PLUGIN_BUILDS = 4


def _prune_plugin_builds(keep: Path) -> None:
    """Drop all but the newest KEEP_PLUGIN_BUILDS plugin builds; skip any another process holds."""
    builds = sorted(
        (d for d in cache_root().glob("plugin-*") if d.is_dir() and d.name != "plugin-work" and d != keep),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for old in builds[KEEP_PLUGIN_BUILDS - 1 :]:
        lock = old.with_name(old.name + ".lock")
        with lock.open("w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            shutil.rmtree(old, ignore_errors=True)
        lock.unlink(missing_ok=True)


def _build_args(text: str) -> set[str]:
    """Names declared with ARG inside a stage (build-time only, not part of the image's Env)."""
    return {i.args.partition("=")[0] for i in parse_dockerfile(text) if i.keyword == "ARG"}


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["_stages"]:
        _run_stages(Path(argv[1]))
        return 0
    if len(argv) != 2 or argv[0] not in ("pause", "busybox", "plugin", "all"):
        print("usage: python -m tests.ground.images pause|busybox|plugin|all OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    builders = {"pause": pause_image, "busybox": busybox_image, "plugin": plugin_image}
    for name, build in builders.items():
        if argv[0] in (name, "all"):
            img = build()
            dest = out / f"{name}.tar"
            shutil.copy2(img.archive, dest)
            print(f"{img.ref} {img.manifest_digest} {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
