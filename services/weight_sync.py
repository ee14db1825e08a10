"""Weight sync from the learner to the samplers: two transports, one check.

``object_store``: the learner returns one :class:`WirePayload` whose tensors travel as
numpy arrays, which Ray stores once and samplers on the same node read without a copy
(torch tensors would be pickled, i.e. copied, per reader). ``torch_distributed``: the
learner (rank 0) broadcasts a header (version, byte count, checksum) and then every
tensor's bytes as one flat buffer to the samplers over a process group (gloo on CPU,
NCCL on GPUs) created with a timeout, so a peer that never arrives fails the run loudly.

Either way the sampler checks the SHA-256 checksum of what arrived before loading it
(``Sampler.apply``), so a corrupted or mismatched payload is refused, never trained on.
A payload may carry a subset of the policy's tensors (the trainable ones of an adapted
policy); the sampler loads those and keeps the rest.
"""

from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

# numpy has no bfloat16: such tensors travel as same-width integers and are viewed back
_CARRIER = {torch.bfloat16: torch.int16}
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}
_HEADER = 16 + 64  # version (8 bytes), payload bytes (8), hex SHA-256 (64)


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {name!r} in a weights payload")
    return _DTYPES[name]


@dataclass(frozen=True)
class WirePayload:
    """Published weights as the object store carries them: arrays plus their torch dtypes."""

    version: int
    checksum: str
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]

    @classmethod
    def from_state(cls, version: int, state: dict[str, torch.Tensor], checksum: str) -> WirePayload:
        arrays, dtypes = {}, {}
        for name, t in state.items():
            t = t.detach().cpu().contiguous()
            dtypes[name] = str(t.dtype)
            arrays[name] = t.view(_CARRIER.get(t.dtype, t.dtype)).numpy()
        return cls(int(version), checksum, arrays, dtypes)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors over the arrays (no copy; arrays read from the object store are read-only,
        and the tensors are only read, by the checksum and by load_state_dict's copy)."""
        out = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for name, arr in self.arrays.items():
                out[name] = torch.from_numpy(arr).view(_dtype(self.dtypes[name]))
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


# ---- torch.distributed ------------------------------------------------------------------
def group_address() -> tuple[str, int]:
    """This node's IP and a free TCP port, for the rank-0 member to host the rendezvous."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


_SYNC: Any = None  # this process's weight-sync process group, once joined


def join_group(address: str, port: int, rank: int, world_size: int, timeout_s: float,
               backend: str = "gloo") -> None:
    """(Re)join the weight-sync group; every member must call this at the same time.

    The group is a process group of its own, built on a TCP store that rank 0 (the learner)
    hosts, not torch.distributed's default group: a learner group's ranks hold that one
    (learner/group.py), and rank 0 belongs to both."""
    import torch.distributed as dist

    global _SYNC
    _SYNC = None  # a previous group (a sampler died, the group is formed again) is dropped
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, rank == 0, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout  # noqa: SLF001 - where this constructor takes its timeout
        _SYNC = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    else:
        _SYNC = dist.ProcessGroupGloo(store, rank, world_size, timeout)


def leave_group() -> None:
    global _SYNC
    _SYNC = None


def _broadcast(t: torch.Tensor) -> None:
    """Rank 0's ``t`` into every member's ``t``, over the weight-sync group."""
    import torch.distributed as dist

    if _SYNC is None:
        raise RuntimeError("not in a weight-sync group (join_group first)")
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    _SYNC.broadcast([t], opts).wait()


def _flat(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].detach().contiguous().reshape(-1).view(torch.uint8) for n in names])


def broadcast_state(version: int, state: dict[str, torch.Tensor], checksum: str,
                    device: str | torch.device = "cpu") -> int:
    """Rank 0: send the header, then the tensors (sorted by name) as one byte buffer.
    Returns the bytes sent."""

    names = sorted(state)
    flat = _flat(state, names).to(device)
    header = torch.zeros(_HEADER, dtype=torch.uint8)
    header[:8] = torch.frombuffer(bytearray(int(version).to_bytes(8, "little")), dtype=torch.uint8)
    header[8:16] = torch.frombuffer(bytearray(flat.numel().to_bytes(8, "little")), dtype=torch.uint8)
    header[16:] = torch.frombuffer(bytearray(checksum.encode("ascii")), dtype=torch.uint8)
    _broadcast(header.to(device))
    _broadcast(flat)
    return flat.numel()


def receive_state(template: dict[str, torch.Tensor],
                  device: str | torch.device = "cpu") -> tuple[int, str, dict[str, torch.Tensor]]:
    """Other ranks: receive what ``broadcast_state`` sends into tensors shaped like
    ``template`` (the sampler's own state); returns (version, checksum, state) unverified."""

    names = sorted(template)
    sizes = [template[n].numel() * template[n].element_size() for n in names]
    header = torch.zeros(_HEADER, dtype=torch.uint8, device=device)
    _broadcast(header)
    header = header.cpu()
    version = int.from_bytes(bytes(header[:8].tolist()), "little")
    nbytes = int.from_bytes(bytes(header[8:16].tolist()), "little")
    checksum = bytes(header[16:].tolist()).decode("ascii")
    if nbytes != sum(sizes):
        # the sender's buffer is still broadcast; receive it so the group stays in step
        _broadcast(torch.empty(nbytes, dtype=torch.uint8, device=device))
        raise ValueError(f"weights for version {version} carry {nbytes} bytes, this sampler's policy "
                         f"has {sum(sizes)}: the learner and sampler policies differ")
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    _broadcast(flat)
    out, lo = {}, 0
    for n, size in zip(names, sizes, strict=True):
        t = template[n]
        out[n] = flat[lo:lo + size].view(t.dtype).reshape(t.shape)
        lo += size
    return version, checksum, out
