"""``python -m lmref.keys``: create, list, rotate and revoke the API keys of the Redis key store
that replicas serve with ``--key-store-url`` (``lmref.production.keys``).

Each command prints JSON on stdout. ``create`` and ``rotate`` print the key's secret under
``"secret"``, this once: only its sha256 is stored, so a lost secret is rotated, not recovered.
``list`` prints each key's record (one JSON line each) and never a secret. A revoked or rotated
key is refused by every replica within a second. The store: ``--store-url`` or env
``LMREF_KEY_STORE_URL``. Plain ``argparse``: four small subcommands, and no import of
transformers (which ``lmref.core.cli`` needs) for a command an operator runs by hand.

Usage::

    export LMREF_KEY_STORE_URL=redis://127.0.0.1:6379/0
    python -m lmref.keys create --owner acme --scopes inference,batch --rate-per-s 5 \\
        --tokens-per-min 20000                   # {"key_id": "key_...", ..., "secret": "sk-lmref-..."}
    python -m lmref.keys list
    python -m lmref.keys rotate key_0123456789abcdef
    python -m lmref.keys revoke key_0123456789abcdef
"""

from __future__ import annotations

import argparse
import json
import sys

from lmref.core.credentials import service_url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmref.keys", description="Manage the API keys of a Redis key store."
    )
    parser.add_argument(
        "--store-url",
        default=service_url("LMREF_KEY_STORE"),
        help="redis://HOST:PORT/DB of the key store (default: env LMREF_KEY_STORE_URL, or a file "
        "LMREF_KEY_STORE_URL_FILE, with LMREF_KEY_STORE_PASSWORD[_FILE]: lmref.core.credentials)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="a new key; prints its secret once")
    create.add_argument("--owner", required=True, help="the tenant whose requests the key makes")
    create.add_argument(
        "--scopes", default="inference", help="comma list of inference, batch, admin"
    )
    create.add_argument("--rate-per-s", type=float, help="requests per second (default: none)")
    create.add_argument("--tokens-per-min", type=int, help="tokens per minute (default: none)")
    commands.add_parser("list", help="every key's record (no secret)")
    for name, text in (("rotate", "a new secret, printed once"), ("revoke", "refuse the key")):
        commands.add_parser(name, help=text).add_argument("key_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.store_url:
        parser.error("no key store: give --store-url redis://... or set LMREF_KEY_STORE_URL")
    import redis

    from lmref.production.keys import KeyStore

    store = KeyStore(args.store_url)
    try:
        if args.command == "create":
            record, secret = store.create(
                args.owner, args.scopes, args.rate_per_s, args.tokens_per_min
            )
            print(json.dumps({**record.public(), "secret": secret}))
        elif args.command == "list":
            for record in store.list():
                print(json.dumps(record.public()))
        elif args.command == "rotate":
            secret = store.rotate(args.key_id)
            print(json.dumps({**store.get(args.key_id).public(), "secret": secret}))
        else:
            print(json.dumps(store.revoke(args.key_id).public()))
    except (KeyError, ValueError) as exc:
        parser.exit(2, f"{parser.prog} {args.command}: {exc.args[0]}\n")
    except redis.RedisError as exc:
        # Not the URL: it may hold the store's password.
        parser.exit(1, f"{parser.prog}: the key store failed: {exc}\n")
    if args.command in ("create", "rotate"):
        print("the secret is shown this once: keep it now", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
