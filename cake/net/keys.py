"""CurveZMQ key pairs: create them, read them, and set them on sockets.

`cake keys NAME` writes NAME.key (the public key, safe to share) and
NAME.key_secret (public and secret key, keep private) in ZeroMQ's certificate
format. A worker is given its secret file and a folder of allowed client public
key files; a master is given its own secret file and each worker's public key.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth

from cake.errors import NetworkError


class KeyFileError(NetworkError):
    """A key file or key folder that cannot be used."""


def create_keys(name: str, folder: str | os.PathLike[str] = ".") -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret in `folder`; return (public, secret) paths."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"bad key name {name!r}: use a plain name like 'worker1'")
    folder = Path(folder).expanduser()
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise KeyFileError(f"{p} already exists: delete it or choose another name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        pub, sec = zmq.auth.create_certificates(folder, name)
        os.chmod(sec, 0o600)
    except OSError as e:
        raise KeyFileError(f"cannot write keys in {folder}: {e}") from None
    return Path(pub), Path(sec)


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a .key_secret file."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(
            f"{path} holds no secret key: pass the NAME.key_secret file, not NAME.key"
        )
    return public, secret


def load_public_key(value: str | os.PathLike[str]) -> bytes:
    """A Z85 public key given as the 40 characters themselves or as a key file."""
    text = os.fspath(value)
    if len(text) == 40 and not Path(text).exists():
        try:
            zmq.utils.z85.decode(text)
        except Exception:
            raise KeyFileError(f"{text!r} is not a Z85 public key") from None
        return text.encode()
    return _load(text)[0]


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise KeyFileError(f"key file {p} not found (create one with `cake keys`)")
    try:
        return zmq.auth.load_certificate(p)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{p} is not a ZeroMQ key file: {e}") from None


def allowed_keys_folder(path: str | os.PathLike[str]) -> Path:
    """Check a folder of allowed client public keys (NAME.key files)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise KeyFileError(f"allowed-keys folder {p} does not exist")
    if not any(p.glob("*.key")):
        raise KeyFileError(
            f"{p} holds no public key files (*.key): copy each master's NAME.key there"
        )
    return p


def start_authenticator(ctx: zmq.Context, allow: Path | None):
    """ZAP handler for a Curve server: only keys in `allow` (None: any client key)."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    location = str(allow) if allow is not None else zmq.auth.CURVE_ALLOW_ANY
    auth.configure_curve(domain="*", location=location)
    return auth


def make_server(sock: zmq.Socket, public: bytes, secret: bytes) -> None:
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_server = True


def make_client(
    sock: zmq.Socket, server_public: bytes, keys: tuple[bytes, bytes] | None
) -> None:
    """Curve client options; without our own keys, an ephemeral pair (encryption
    only: a worker with allowed keys refuses it)."""
    public, secret = keys if keys is not None else zmq.curve_keypair()
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = server_public
