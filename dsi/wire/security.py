"""TLS, mutual TLS and bearer tokens on dsi's gRPC and HTTP hops.

Off by default (plaintext, no token: loopback demos). Turned on per process:

* a server (:class:`ServerSecurity`, built from ``--tls-cert``, ``--tls-key``,
  ``--tls-ca`` and ``--auth-token-file``) serves TLS with its certificate;
  with a CA it also requires every client to present a certificate that CA
  signed (mutual TLS); with a token it requires the metadata (gRPC) or header
  (HTTP) ``authorization: Bearer <token>`` (checked by
  :mod:`dsi.serving.gate` and :func:`dsi.serving.web.start_http`).
* a client (:class:`ClientSecurity`: the coordinator's channels to targets and
  drafters, ``dsi generate``, :class:`dsi.wire.client.Client`) verifies the
  server's certificate against a CA (default: the system's roots), presents
  its own certificate for mutual TLS, and sends the token with every call.

Certificates and keys are PEM files. Nothing here generates or stores keys.
"""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from dsi.domain.errors import InvalidArgument

#: The environment variable clients read a bearer token from when no token file is given.
TOKEN_ENV = "DSI_AUTH_TOKEN"
AUTHORIZATION = "authorization"


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the {what} {str(path)!r}: {exc.strerror or exc}") from None
    if not data.strip():
        raise InvalidArgument(f"the {what} {str(path)!r} is empty")
    return data


def read_token(path: str | Path) -> str:
    """A bearer token from a file (surrounding whitespace and a final newline
    are dropped: ``kubectl create secret --from-file`` and ``echo`` add one)."""
    token = _read(path, "token file").decode("utf-8", errors="strict").strip()
    if any(c.isspace() for c in token) or not token.isprintable():
        raise InvalidArgument(f"the token in {str(path)!r} must be one word of printable characters")
    return token


def bearer(token: str) -> str:
    return f"Bearer {token}"


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``authorization`` value carries ``token`` (constant-time)."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


# --- servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSecurity:
    """What a server requires of its clients. The default: nothing (plaintext)."""

    cert: Path | None = None
    key: Path | None = None
    #: CA bundle that signs the certificates clients must present (mutual TLS); None = no client certificate
    ca: Path | None = None
    #: bearer token every call must carry; None = none needed
    token: str | None = None

    @classmethod
    def create(
        cls,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ca: str | Path | None = None,
        token_file: str | Path | None = None,
    ) -> ServerSecurity:
        """Check the files now (a clear error at start-up, not at the first call)."""
        if bool(cert) != bool(key):
            raise InvalidArgument("--tls-cert and --tls-key go together: give both, or neither")
        if ca and not cert:
            raise InvalidArgument("--tls-ca (client certificates) needs TLS: give --tls-cert and --tls-key too")
        sec = cls(
            Path(cert) if cert else None,
            Path(key) if key else None,
            Path(ca) if ca else None,
            read_token(token_file) if token_file else None,
        )
        if sec.tls:
            sec.ssl_context()  # loads and checks the certificate, key and CA
        return sec

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def mutual(self) -> bool:
        return self.ca is not None

    def describe(self) -> str:
        parts = ["mutual TLS" if self.mutual else "TLS" if self.tls else "plaintext"]
        if self.token:
            parts.append("bearer token")
        return " + ".join(parts)

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials of a secure port; None for plaintext."""
        if not self.tls:
            return None
        assert self.cert is not None and self.key is not None
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        roots = _read(self.ca, "TLS CA bundle") if self.ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=self.mutual)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the HTTP servers; None for plaintext."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
            if self.ca:
                ctx.load_verify_locations(cafile=str(self.ca))
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"cannot use the TLS files ({self.cert}, {self.key}, {self.ca}): {exc}") from None
        return ctx


# --- clients ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSecurity:
    """How a client talks to a server. The default: plaintext, no token."""

    tls: bool = False
    #: PEM CA bundle that must have signed the server's certificate; None = the system's roots
    ca: bytes | None = None
    #: PEM certificate chain and key presented for mutual TLS
    cert: bytes | None = None
    key: bytes | None = None
    #: the name the server's certificate must carry; None = the host of the address dialled
    server_name: str | None = None
    token: str | None = None

    @classmethod
    def create(
        cls,
        tls: bool = False,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
        token_file: str | Path | None = None,
        token: str | None = None,
    ) -> ClientSecurity:
        """From files; any TLS file (or ``tls``) turns TLS on."""
        if bool(cert) != bool(key):
            raise InvalidArgument("a client certificate and its key go together: give both, or neither")
        if token_file:
            token = read_token(token_file)
        return cls(
            tls=bool(tls or ca or cert or server_name),
            ca=_read(ca, "TLS CA bundle") if ca else None,
            cert=_read(cert, "TLS certificate") if cert else None,
            key=_read(key, "TLS key") if key else None,
            server_name=server_name or None,
            token=token or None,
        )

    def for_name(self, name: str) -> ClientSecurity:
        """The same, checking certificates for ``name`` unless a name is set
        already (replicas found by DNS are dialled by IP address, but their
        certificates name the DNS name)."""
        return self if self.server_name or not self.tls else replace(self, server_name=name)

    def channel(
        self,
        address: str,
        options: Sequence[tuple[str, object]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> grpc.aio.Channel:
        opts = list(options)
        chain = list(interceptors or [])
        if self.token:
            chain = [*token_interceptors(self.token), *chain]
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=opts, interceptors=chain or None)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        creds = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        return grpc.aio.secure_channel(address, creds, options=opts, interceptors=chain or None)

    def ssl_context(self) -> ssl.SSLContext | None:
        """For HTTP clients (tests, tools); None for plaintext."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cadata=self.ca.decode() if self.ca else None)
        if self.cert and self.key:
            import tempfile

            # ssl loads a certificate chain from files only.
            with tempfile.TemporaryDirectory() as tmp:
                c, k = Path(tmp, "c.pem"), Path(tmp, "k.pem")
                c.write_bytes(self.cert)
                k.write_bytes(self.key)
                os.chmod(k, 0o600)
                ctx.load_cert_chain(str(c), str(k))
        return ctx


PLAINTEXT = ClientSecurity()


def _with_token(details: grpc.aio.ClientCallDetails, value: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[AUTHORIZATION] = value
    return details._replace(metadata=metadata)  # type: ignore[attr-defined]


class _TokenUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, value: str) -> None:
        self.value = value

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.value), request)


class _TokenUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, value: str) -> None:
        self.value = value

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.value), request)


class _TokenStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, value: str) -> None:
        self.value = value

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self.value), request_iterator)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send ``authorization: Bearer <token>`` with
    every call (metadata, not call credentials: those gRPC sends only over
    TLS, and a token is also useful behind a TLS-terminating proxy)."""
    value = bearer(token)
    return [_TokenUnaryUnary(value), _TokenUnaryStream(value), _TokenStreamStream(value)]
