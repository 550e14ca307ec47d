#!/usr/bin/env python3
"""A Leash agent in Python: begin -> renew -> complete over mutual TLS.

The gRPC stubs are generated from proto/leash/v1/leash.proto with grpcio-tools
at start-up (into a temporary directory; nothing generated is committed). Every
JWT credential the broker issues is verified with PyJWT against the broker's
JWK Set (GET /.well-known/jwks.json on the ops port): signature, audience,
issuer and expiry. Prints one JSON object with what happened; never prints a
credential value. Exits 0 only if every step succeeded.

With --oauth, it also uses the OAuth 2.0 front door with plain `requests`
over mutual TLS: an RFC 8693 token exchange of its first JWT for the resource
--exchange-resource (authenticated by its X.509-SVID, RFC 8705), checks the
issued token with PyJWT (audience, certificate binding), and introspects it
per RFC 7662 as the resource server --introspect-cert/--introspect-key, before
and after the completion.

Against `leash dev` (run from the directory holding .leash-dev/):

    python examples/python/client.py --template demo --param repo=acme/widgets \
        --intent "review PR 42"
    python examples/python/client.py --template demo --param repo=acme/widgets \
        --oauth https://localhost:8444 --exchange-resource https://api.github.example \
        --introspect-cert .leash-dev/resource.pem --introspect-key .leash-dev/resource-key.pem
"""

import argparse
import base64
import hashlib
import importlib
import json
import os
import sys
import tempfile
import time

import grpc
import jwt
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def generate_stubs(proto_root):
    """Generates leash/v1/leash_pb2{,_grpc}.py and returns the two modules."""
    out = tempfile.mkdtemp(prefix="leash-py-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_root, "leash", "v1", "leash.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with status {rc}")
    sys.path.insert(0, out)
    return (
        importlib.import_module("leash.v1.leash_pb2"),
        importlib.import_module("leash.v1.leash_pb2_grpc"),
    )


def read(path):
    with open(path, "rb") as f:
        return f.read()


def parse_args():
    dev = os.environ.get("LEASH_DEV_DIR", ".leash-dev")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", default=os.environ.get("LEASH_BROKER", "localhost:8443"),
                   help="host:port of the broker's agent (mTLS) port")
    p.add_argument("--server-name", default=None,
                   help="name the broker certificate must carry (default: the host)")
    p.add_argument("--ca", default=os.environ.get("LEASH_CA", f"{dev}/bundle.pem"))
    p.add_argument("--cert", default=os.environ.get("LEASH_CERT", f"{dev}/agent.pem"))
    p.add_argument("--key", default=os.environ.get("LEASH_KEY", f"{dev}/agent-key.pem"))
    p.add_argument("--jwks", default="http://127.0.0.1:8081/.well-known/jwks.json",
                   help="the broker's JWK Set URL (ops port)")
    p.add_argument("--issuer", default=None, help="expected `iss` of JWTs (checked when set)")
    p.add_argument("--template", help="template to begin a task of (or use --redeem-task)")
    p.add_argument("--redeem-task", default=None,
                   help="redeem this delegated task instead of beginning one (with --handle)")
    p.add_argument("--handle", default=os.environ.get("LEASH_DELEGATION_HANDLE"),
                   help="the delegation handle for --redeem-task")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--intent", default="python interop")
    p.add_argument("--proto", default=os.path.join(ROOT, "proto"),
                   help="directory holding leash/v1/leash.proto")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    p.add_argument("--oauth", default=None,
                   help="base URL of the broker's OAuth listener, e.g. https://localhost:8444")
    p.add_argument("--exchange-resource", default=None,
                   help="the resource (RFC 8707) to exchange the first JWT for")
    p.add_argument("--exchange-scope", default=None, help="scopes to ask for (space-separated)")
    p.add_argument("--introspect-cert", default=None, help="a resource server's SVID (PEM)")
    p.add_argument("--introspect-key", default=None, help="its key (PEM)")
    return p.parse_args()


def verify_jwts(credentials, jwks, issuer, kind_jwt):
    """Verifies every JWT credential with PyJWT; returns their checked claims."""
    checked = []
    for c in credentials:
        if c.kind != kind_jwt:
            continue
        key = jwks.get_signing_key_from_jwt(c.value)
        claims = jwt.decode(
            c.value,
            key,
            algorithms=["EdDSA", "ES256"],
            audience=c.audience,
            issuer=issuer,
            options={"require": ["exp", "iat", "nbf", "sub", "aud", "jti"]},
        )
        if claims["jti"] != c.id:
            raise SystemExit(f"jti {claims['jti']} is not the credential id {c.id}")
        checked.append({
            "credential_id": c.id,
            "alg": jwt.get_unverified_header(c.value)["alg"],
            "sub": claims["sub"],
            "aud": claims["aud"],
            "scope": claims.get("scope"),
            "exp": claims["exp"],
            "bound": "cnf" in claims,
            # RFC 8693 4.1: the current actor outermost, earlier actors nested.
            "act": claims.get("act"),
        })
    return checked


TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"


def x5t_s256(cert_pem):
    """RFC 8705 3.1: base64url SHA-256 of the DER certificate, unpadded."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def introspect(args, token):
    """RFC 7662 as the resource server: form POST, mTLS client authentication."""
    r = requests.post(f"{args.oauth}/introspect", data={"token": token},
                      cert=(args.introspect_cert, args.introspect_key), verify=args.ca,
                      timeout=args.timeout)
    if r.status_code != 200 or "application/json" not in r.headers.get("Content-Type", ""):
        raise SystemExit(f"introspection: HTTP {r.status_code}: {r.text}")
    return r.json()


def exchange(args, subject_token, jwks):
    """RFC 8693 token exchange with plain requests; returns what was checked."""
    meta = requests.get(f"{args.oauth}/.well-known/oauth-authorization-server",
                        verify=args.ca, timeout=args.timeout).json()
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN,
        "resource": args.exchange_resource,
    }
    if args.exchange_scope:
        form["scope"] = args.exchange_scope
    r = requests.post(meta["token_endpoint"], data=form, cert=(args.cert, args.key),
                      verify=args.ca, timeout=args.timeout)
    if r.status_code != 200:
        raise SystemExit(f"token exchange: HTTP {r.status_code}: {r.text}")
    if r.headers.get("Cache-Control") != "no-store":
        raise SystemExit("token response without Cache-Control: no-store (RFC 6749 5.1)")
    answer = r.json()
    token = answer["access_token"]
    key = jwks.get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key, algorithms=["EdDSA", "ES256"],
                        audience=args.exchange_resource, issuer=meta["issuer"],
                        options={"require": ["exp", "iat", "sub", "aud", "jti"]})
    bound = claims.get("cnf", {}).get("x5t#S256") == x5t_s256(read(args.cert))
    # Without a client certificate the token endpoint refuses (RFC 6749 5.2).
    anonymous = requests.post(meta["token_endpoint"], data=form, verify=args.ca,
                              timeout=args.timeout)
    return token, {
        "metadata_issuer": meta["issuer"],
        "token_type": answer["token_type"],
        "issued_token_type": answer["issued_token_type"],
        "expires_in": answer["expires_in"],
        "scope": answer["scope"],
        "aud": claims["aud"],
        "task_id": claims["task_id"],
        "bound_to_my_certificate": bound,
        "without_certificate": [anonymous.status_code, anonymous.json().get("error")],
    }


def main():
    args = parse_args()
    pb, pb_grpc = generate_stubs(args.proto)
    host = args.broker.rsplit(":", 1)[0]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key),
        certificate_chain=read(args.cert),
    )
    options = [("grpc.ssl_target_name_override", args.server_name or host)]
    jwks = jwt.PyJWKClient(args.jwks, cache_keys=True)
    result = {"began": False, "renewed": False, "completed": False}
    with grpc.secure_channel(args.broker, credentials, options=options) as channel:
        broker = pb_grpc.BrokerStub(channel)
        params = dict(p.split("=", 1) for p in args.param)
        if args.redeem_task:
            if not args.handle:
                raise SystemExit("--redeem-task needs --handle (or LEASH_DELEGATION_HANDLE)")
            begun = broker.RedeemDelegation(
                pb.RedeemDelegationRequest(task_id=args.redeem_task,
                                           delegation_handle=args.handle),
                timeout=args.timeout,
            )
        else:
            if not args.template:
                raise SystemExit("give --template (or --redeem-task)")
            begun = broker.BeginTask(
                pb.BeginTaskRequest(template=args.template, parameters=params,
                                    intent=args.intent),
                timeout=args.timeout,
            )
        result.update(
            began=True,
            task_id=begun.task_id,
            actors=list(begun.actors),
            credentials=[
                {"id": c.id, "grant": c.grant, "kind": pb.CredentialKind.Name(c.kind),
                 "audience": c.audience, "scopes": list(c.scopes)}
                for c in begun.credentials
            ],
            jwts_verified=verify_jwts(begun.credentials, jwks, args.issuer,
                                      pb.CREDENTIAL_KIND_JWT),
        )
        exchanged = None
        if args.oauth:
            first_jwt = next(c.value for c in begun.credentials
                             if c.kind == pb.CREDENTIAL_KIND_JWT)
            exchanged, checked = exchange(args, first_jwt, jwks)
            checked["introspected"] = introspect(args, exchanged)
            result["exchange"] = checked
        time.sleep(0.2)
        renewed = broker.RenewLease(pb.RenewLeaseRequest(task_id=begun.task_id),
                                    timeout=args.timeout)
        result.update(
            renewed=True,
            renewed_lease_expires_at=renewed.lease_expires_at.ToJsonString(),
            renewed_credential_ids=[c.id for c in renewed.credentials],
            renewed_jwts_verified=verify_jwts(renewed.credentials, jwks, args.issuer,
                                              pb.CREDENTIAL_KIND_JWT),
        )
        done = broker.CompleteTask(
            pb.CompleteTaskRequest(task_id=begun.task_id, outcome=pb.OUTCOME_SUCCEEDED,
                                   summary="done from Python"),
            timeout=args.timeout,
        )
        result.update(
            completed=True,
            state=pb.LeaseState.Name(done.state),
            revoked_credentials=done.revoked_credentials,
        )
        if exchanged:
            result["exchange"]["introspected_after_completion"] = introspect(args, exchanged)
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        print(json.dumps({"error": f"{e.code().name}: {e.details()}"}))
        sys.exit(1)
