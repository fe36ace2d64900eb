"""Sizes as people write and read them: ``parse_size('5G')`` and ``human_size(3_500_000) == '3.3 MiB'``."""

from __future__ import annotations

from mergesmith.core.errors import MergeError


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux's MemAvailable), or None where it is
    not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def parse_size(text: str | int) -> int:
    """'5G', '500M', '2.5GB', '1024' -> bytes (K/M/G/T are powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B")
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    binary = {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    try:
        for suffix, mult in binary.items():
            if s.endswith(suffix):
                return int(float(s[:-2]) * mult)
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(float(s))
    except (ValueError, OverflowError):  # OverflowError: inf, or a number past float's range
        raise MergeError(
            f"cannot read size {text!r}; use a finite number with an optional K, M or G suffix"
        ) from None


def human_size(n: float) -> str:
    """Bytes as a short human size in binary units: 512 B, 3.4 KiB, 12.0 MiB, 1.50 GiB, 2.00 TiB."""
    n = float(n)
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit in ("GiB", "TiB") else f"{n:.1f} {unit}"
    raise AssertionError  # unreachable


def size_change(before: int, after: int) -> str:
    """'1.0 MiB -> 256.0 KiB (4.00x smaller)' or '... (2.00x larger)': a ratio that reads the right way."""
    if before <= 0 or after <= 0 or before == after:
        return f"{human_size(before)} -> {human_size(after)}"
    if after < before:
        return f"{human_size(before)} -> {human_size(after)} ({before / after:.2f}x smaller)"
    return f"{human_size(before)} -> {human_size(after)} ({after / before:.2f}x larger)"
