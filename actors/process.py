"""What every process that decodes or drafts does once it is built; a port for a server it starts."""

from __future__ import annotations

import errno
import gc
import random
import socket


def freeze_gc_heap() -> None:
    """Put every object alive now (modules, tokenizers, drafter tables: they live as long as the process)
    out of the cyclic GC's reach, as vLLM does after startup: a full collection, which can land inside any
    batch step, then walks a few hundred objects instead of ~0.5 M (results/2026-12-02-gc). Call again
    once drafters are built."""
    gc.collect()
    gc.freeze()


def free_port(host: str = "") -> int:
    """A TCP port that binds on ``host`` ("": every interface, IPv6 included where there is one) now, drawn
    below the kernel's ephemeral range. A port taken by binding port 0 is an ephemeral one, which any
    process's outgoing connection may take before the server binds it: Ray opens hundreds, and a Serve
    proxy once failed on "[::]:34141" that way."""
    low = _ephemeral_low()
    rng = random.Random()  # seeded from the OS: concurrent callers draw different ports
    for _ in range(500):
        port = rng.randrange(min(10_000, low // 2), low)
        if _binds(host, port):
            return port
    raise RuntimeError(f"no free TCP port below {low}")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _binds(host: str, port: int) -> bool:
    if host:
        families = [socket.AF_INET6 if ":" in host else socket.AF_INET]
    else:
        families = [socket.AF_INET6, socket.AF_INET]
    for family in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        except OSError as e:
            no_ipv6 = family == socket.AF_INET6 and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
            if no_ipv6 and not host:  # this host has no IPv6: IPv4 alone decides
                continue
            return False
    return True
