"""One model, several threads: a threaded server calls model(x), prefill and step of one shared
eval-mode model from its workers. The per-module caches (kernels, spectra, S4's output matrix and
internal length, step forms) must give every thread its own call's result.

Each test computes single-threaded references first, then lets 6 threads loop over the same cases
in different orders (different L, rates, batch sizes at once) and compares every output. Same code
and same data: the outputs match to float32 rounding (checked at 1e-5 relative to the largest
entry), where a race gives O(1) errors, shape errors or KeyErrors. A tiny switch interval makes the
interpreter hand over between threads every few bytecodes, so a race shows within a few rounds.
"""

from __future__ import annotations

import copy
import sys
import threading
from typing import Any, Callable, List, Sequence

import pytest
import torch

import lrnnx_zoo

KERNELS = [b.split(".", 1)[1] for b in lrnnx_zoo.list_backends("ssm_kernel")]
THREADS, ROUNDS = 6, 6


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> bool:
    return got.shape == want.shape and bool(
        ((got - want).abs().max() <= rtol * want.abs().max().clamp_min(1e-30)).item())


def hammer(run: Callable[[Any], torch.Tensor], cases: Sequence[Any], refs: Sequence[torch.Tensor],
           rtol: float = 1e-5, grad_mode: Any = None, rounds: int = ROUNDS) -> List[str]:
    """Run ``run(case)`` from THREADS threads, each ROUNDS times over ``cases`` starting at its own
    offset, under ``grad_mode`` (default no_grad, a server's inference), and return what went wrong
    (exceptions, outputs off their reference by more than rtol)."""
    grad_mode = torch.no_grad() if grad_mode is None else grad_mode
    problems: List[str] = []
    start = threading.Barrier(THREADS)

    def worker(offset: int) -> None:
        start.wait()
        for r in range(rounds * len(cases)):
            with grad_mode:                   # grad mode is per thread: the worker sets its own
                i = (offset + r) % len(cases)
                try:
                    got = run(cases[i])
                except Exception as exc:      # noqa: BLE001 -- any failure is the finding
                    problems.append(f"case {cases[i]}: {type(exc).__name__}: {exc}")
                    continue
                if not _close(got, refs[i], rtol):
                    err = (got - refs[i]).abs().max().item() if got.shape == refs[i].shape else tuple(got.shape)
                    problems.append(f"case {cases[i]}: off by {err}")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    return problems


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_cache_under_concurrent_lengths_and_rates(name):
    """Kernels of different (L, rate) from several threads: the two-entry cache evicted an entry
    another thread had just evicted (KeyError) or iterated while another changed it."""
    torch.manual_seed(0)
    k = lrnnx_zoo.get_backend("ssm_kernel", name)(4, 8).eval()     # small: many cache look-ups a second
    rates = (1.0, 0.5)
    cases = [(L, r) for L in (24, 32, 40, 48, 64, 100, 128) for r in rates]
    run = lambda c: k(L=c[0], rate=c[1])[0]                   # noqa: E731
    with torch.no_grad():
        run((256, 1.0))                                       # S4: internal length settled (see below)
        refs = [run(c).clone() for c in cases]
        assert not hammer(run, cases, refs, rounds=40)[:3]


@pytest.mark.parametrize("name", KERNELS)
def test_spectrum_cache_under_concurrent_sizes(name):
    """spectrum() drops the kernel it transformed from the cache (_forget) while other threads add
    and evict entries."""
    torch.manual_seed(0)
    k = lrnnx_zoo.get_backend("ssm_kernel", name)(4, 8).eval()
    cases = [(L, n) for L, n in ((24, 48), (32, 64), (48, 96), (64, 128), (100, 200), (128, 256))]
    run = lambda c: torch.view_as_real(k.spectrum(c[0], c[1]))   # noqa: E731
    with torch.no_grad():
        k(L=256)
        refs = [run(c).clone() for c in cases]
        assert not hammer(run, cases, refs, rounds=40)[:3]


@pytest.mark.parametrize("family", ["s4", "s4d", "fftconv", "lru"])
def test_layer_forward_under_concurrent_lengths_and_batches(family):
    """A shared eval-mode layer called with different (B, L) from several threads."""
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer(family, 16, d_state=16).eval()
    xs = {(B, L): torch.randn(B, L, 16) for B, L in ((1, 40), (3, 64), (2, 100), (4, 128))}
    cases = list(xs)
    run = lambda c: layer(xs[c])[0]                          # noqa: E731
    with torch.no_grad():
        layer(torch.randn(1, 256, 16))
        refs = [run(c).clone() for c in cases]
        assert not hammer(run, cases, refs)[:3]


def test_s4_length_extension_while_other_threads_generate():
    """S4 rewrites its C~ in place when a longer L arrives (rate 1). A thread generating a kernel at
    that moment read the new C~ with the old internal length (or half-written C~): O(1) off.

    The references come from a copy whose internal length already covers every L; the threads'
    kernels may be generated from a C~ of another length, which differs by the rounding of C~'s
    float32 transform: the tolerance is 1e-3 of the largest entry (measured: ~1e-5), a race is O(1)."""
    torch.manual_seed(0)
    fresh = lrnnx_zoo.get_backend("ssm_kernel", "s4")(64, 16, L=64).eval()
    settled = copy.deepcopy(fresh)
    cases = [40, 48, 56, 64, 2048]    # the threads starting short generate while another one extends
    with torch.no_grad():
        settled(L=max(cases))
        refs = [settled(L=L)[0].clone() for L in cases]
    problems = []
    for trial in range(8):            # each trial starts from the short length: the race is in round 1
        k = copy.deepcopy(fresh)
        problems += hammer(lambda L: k(L=L)[0], cases, refs, rtol=1e-3, rounds=2)
    assert not problems[:3]
