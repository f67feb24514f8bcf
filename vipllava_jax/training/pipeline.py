"""Fine-tuning batches: LLaVA records -> encoded `Example`s (`encoding.encode_example`) -> padded, bucketed numpy
batches, through `grain`.

Batches (`make_train_iterator`, `make_eval_iterator`): dicts of numpy arrays

    input_ids       [B, T] int32   right padded with pad_token_id
    attention_mask  [B, T] int32   1 = token, 0 = padding
    labels          [B, T] int32   -100 = ignored
    pixel_values    [I, 3, H, W] float32  the images in row-major order of appearance, then zero padding images
    image_valid     [I] bool       True for the real images (they come first)
    num_tokens      [] int32       labels != -100 in the batch

T is the smallest of `DataConfig.length_buckets` that fits the longest row and I the smallest image bucket
that fits the batch's images, so a jitted step compiles once per (T, I) pair, a handful in all. A short last
batch (finite epochs, eval) is filled with padding rows (all masked, labels -100), so B never changes.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Iterator, Sequence

import grain
import numpy as np
from absl import flags as absl_flags

from .config import DataConfig
from .encoding import DataError, Example, ExampleDropped, encode_example
from .loss import IGNORE_INDEX

__all__ = ["STAT_KEYS", "DataIterator", "collate", "make_train_iterator", "make_eval_iterator"]


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"{n} {what} exceed the largest bucket {max(buckets)}")


def collate(examples: Sequence[Example], cfg: DataConfig, batch_size: int | None = None,
            image_shape: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
    """Examples -> one batch dict (see the module docstring for keys, shapes and dtypes). Rows beyond the
    examples (up to batch_size) are padding rows; T and I are rounded up to cfg's buckets."""
    b = batch_size or cfg.batch_size
    if len(examples) > b:
        raise ValueError(f"{len(examples)} examples for a batch of {b}")
    t = _bucket(max([len(e.input_ids) for e in examples] + [1]), cfg.lengths, "tokens")
    n_img = sum(e.pixel_values.shape[0] for e in examples)
    i = _bucket(max(n_img, 1), cfg.images_buckets(b), "images")
    if image_shape is None:
        image_shape = next((e.pixel_values.shape[1:] for e in examples), (3, 0, 0))
    input_ids = np.full((b, t), cfg.pad_token_id, np.int32)
    attention_mask = np.zeros((b, t), np.int32)
    labels = np.full((b, t), IGNORE_INDEX, np.int32)
    pixel_values = np.zeros((i,) + tuple(image_shape), np.float32)
    image_valid = np.zeros((i,), bool)
    k = 0
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[r, :n], attention_mask[r, :n], labels[r, :n] = e.input_ids, 1, e.labels
        m = e.pixel_values.shape[0]
        if m:
            pixel_values[k:k + m] = e.pixel_values
            image_valid[k:k + m] = True
            k += m
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": pixel_values, "image_valid": image_valid,
            "num_tokens": np.asarray((labels != IGNORE_INDEX).sum(), np.int32)}


@dataclasses.dataclass
class _Skip:
    record_id: str
    reason: str  # "too_long", "no_labels", "bad"
    message: str
    epoch: int


class _Encode:
    """The grain map: (index in the repeated, shuffled stream, record) -> Example or _Skip. A class, so it
    pickles to worker processes."""

    def __init__(self, processor, cfg: DataConfig, image_folder, n_records: int, start_epoch: int):
        self.processor, self.cfg, self.image_folder = processor, cfg, image_folder
        self.n, self.start_epoch = n_records, start_epoch
        # cache_examples: id(record) -> (record, Example or _Skip); the record is kept to check identity.
        self._cache: dict | None = {} if cfg.cache_examples else None

    def __getstate__(self):  # a worker process starts with an empty cache
        state = dict(self.__dict__)
        if state["_cache"] is not None:
            state["_cache"] = {}
        return state

    def __call__(self, index: int, record: dict):
        epoch = self.start_epoch + index // self.n
        if self._cache is not None:
            hit = self._cache.get(id(record))
            if hit is not None and hit[0] is record:
                return dataclasses.replace(hit[1], epoch=epoch)
        out = self._encode(record, epoch)
        # A record without regions has one example whatever the epoch (no marker is drawn); a bad one is not
        # kept (its error is raised, or counted each time it comes).
        if self._cache is not None and not (isinstance(out, _Skip) and out.reason == "bad") \
                and not (record.get("bboxes") or record.get("segmentations")):
            self._cache[id(record)] = (record, out)
        return out

    def _encode(self, record: dict, epoch: int):
        try:
            return encode_example(record, self.processor, self.cfg, image_folder=self.image_folder, epoch=epoch)
        except ExampleDropped as e:
            return _Skip(e.record_id, e.reason, str(e), epoch)
        except DataError as e:
            if not self.cfg.skip_bad_examples:
                raise
            return _Skip(e.record_id, "bad", str(e), epoch)


STAT_KEYS = ("batches", "examples", "dropped_too_long", "dropped_no_labels", "skipped_bad", "truncated")


class DataIterator:
    """Batches (dicts, see the module docstring) from a grain pipeline, with exact save / restore.

    `get_state()` -> a JSON-serialisable dict (grain's iterator state and the counters) taken between batches;
    `set_state(state)` on a new iterator built with the same arguments continues with exactly the next batches.
    `stats()` -> {"batches", "examples", "dropped_too_long", "dropped_no_labels", "skipped_bad", "truncated",
    "dropped" (the three drops together), "epoch" (of the last example read), "last_skips" (the last few skip
    messages)}.
    """

    def __init__(self, dataset: grain.IterDataset, cfg: DataConfig, batch_size: int, image_shape,
                 num_batches: int | None = None, group: int = 0):
        self._ds, self._cfg, self._b, self._image_shape = dataset, cfg, batch_size, image_shape
        self._it = iter(dataset)
        self._num_batches = num_batches  # eval: exactly this many batches (padding batches at the end)
        self._stats = {k: 0 for k in STAT_KEYS}
        self._stats["epoch"] = 0
        self._last_skips: list[str] = []
        self._exhausted = False
        # group_by_length: the batches of the current group not yet yielded, and what get_state needs to
        # rebuild the group exactly (grain's state and our counters before it was read, and how many of its
        # batches were already yielded): a group is re-read and re-sorted rather than saved.
        self._group = group if group > 1 else 0
        self._pending: list[list[Example]] = []
        self._group_start: dict | None = None
        self._group_index = 0
        self._yielded = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def _read(self, n: int) -> list[Example]:
        """Up to n examples from the stream (skips counted), fewer only at its end."""
        examples: list[Example] = []
        while len(examples) < n and not self._exhausted:
            try:
                item = next(self._it)
            except StopIteration:
                self._exhausted = True
                break
            self._stats["epoch"] = item.epoch
            if isinstance(item, _Skip):
                key = {"too_long": "dropped_too_long", "no_labels": "dropped_no_labels"}.get(item.reason,
                                                                                             "skipped_bad")
                self._stats[key] += 1
                self._last_skips = (self._last_skips + [item.message])[-5:]
                continue
            self._stats["truncated"] += int(item.truncated)
            examples.append(item)
        return examples

    def _read_group(self) -> None:
        """Read the next group_by_length x B examples, sort them by length (stable: ties keep stream order)
        and queue them as batches in an order drawn from (seed, group index)."""
        self._group_start = {"grain": self._it.get_state(), "stats": dict(self._stats),
                             "last_skips": list(self._last_skips), "exhausted": self._exhausted,
                             "group_index": self._group_index}
        examples = sorted(self._read(self._group * self._b), key=lambda e: len(e.input_ids))
        chunks = [examples[i:i + self._b] for i in range(0, len(examples), self._b)]
        order = np.random.default_rng([self._cfg.seed, self._group_index]).permutation(len(chunks))
        self._pending = [chunks[i] for i in order]
        self._group_index += 1
        self._yielded = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._num_batches is not None and self._stats["batches"] >= self._num_batches:
            raise StopIteration
        if self._group:
            if not self._pending:
                self._read_group()
            examples = self._pending.pop(0) if self._pending else []
            self._yielded += 1
        else:
            examples = self._read(self._b)
        if not examples and (self._num_batches is None or self._stats["batches"] >= self._num_batches):
            raise StopIteration
        self._stats["batches"] += 1
        self._stats["examples"] += len(examples)
        return collate(examples, self._cfg, self._b, self._image_shape)

    def get_state(self) -> dict:
        if self._group and self._pending:
            start = self._group_start
            return {"grain": start["grain"], "stats": start["stats"], "exhausted": start["exhausted"],
                    "group": {"index": start["group_index"], "yielded": self._yielded,
                              "last_skips": start["last_skips"]}}
        state = {"grain": self._it.get_state(), "stats": dict(self._stats), "exhausted": self._exhausted}
        if self._group:
            state["group"] = {"index": self._group_index, "yielded": 0, "last_skips": list(self._last_skips)}
        return state

    def set_state(self, state: dict) -> None:
        group = state.get("group")
        if bool(group) != bool(self._group):
            raise ValueError("this data state was saved with group_by_length "
                             f"{'on' if group else 'off'}; the iterator has it {'on' if self._group else 'off'}")
        self._it.set_state(state["grain"])
        self._stats = {**{k: 0 for k in STAT_KEYS}, "epoch": 0, **state.get("stats", {})}
        self._exhausted = bool(state.get("exhausted", False))
        self._pending, self._yielded = [], 0
        if group:
            self._group_index = int(group["index"])
            self._last_skips = list(group.get("last_skips", []))
            if group["yielded"]:  # the save fell inside a group: read it again and skip what was yielded
                self._read_group()
                for _ in range(int(group["yielded"])):
                    examples = self._pending.pop(0)
                    self._yielded += 1
                    self._stats["batches"] += 1
                    self._stats["examples"] += len(examples)

    def close(self) -> None:
        """Stop grain's worker processes / threads now (otherwise they stop when the iterator is collected)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "DataIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        s = dict(self._stats)
        s["dropped"] = s["dropped_too_long"] + s["dropped_no_labels"] + s["skipped_bad"]
        s["last_skips"] = list(self._last_skips)
        return s


def _pipeline(records, processor, cfg, image_folder, *, shard_index, shard_count, num_epochs, start_epoch,
              shuffle, num_workers, num_threads, allow_empty=False):
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, {shard_count})")
    share = list(records)[shard_index::shard_count]
    if not share and not allow_empty:
        raise ValueError(f"host {shard_index} of {shard_count} gets no records ({len(records)} in all)")
    ds = grain.MapDataset.source(share)
    if shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # grain reshuffles each repetition: another (seeded) order per epoch
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_Encode(processor, cfg, image_folder, max(len(share), 1), start_epoch))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 1)))
    if num_workers > 0:
        if not absl_flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, use defaults
            absl_flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it, len(share)


class _HostRows:
    """Index k of one host's stream -> index in the global stream. Host i of p takes rows [i*b, (i+1)*b) of
    every global batch of p*b rows, so the global batches are the same whatever the number of hosts."""

    def __init__(self, source: grain.MapDataset, rows: int, hosts: int, host: int):
        self.source, self.rows, self.hosts, self.host = source, rows, hosts, host

    def global_index(self, k: int) -> int:
        return (k // self.rows) * self.rows * self.hosts + self.host * self.rows + k % self.rows

    def __call__(self, k: int):
        return self.source[self.global_index(k)]


def _host_length(total: int, rows: int, hosts: int, host: int) -> int:
    """How many of a global stream of `total` items host `host` gets under `_HostRows`."""
    blocks, rem = divmod(total, rows)
    n = (blocks // hosts + (1 if blocks % hosts > host else 0)) * rows
    return n + (rem if blocks % hosts == host else 0)


def _train_pipeline(records, processor, cfg, image_folder, *, rows, shard_index, shard_count, num_epochs,
                    start_epoch, num_workers, num_threads):
    """The global stream (every record, shuffled per epoch with cfg.seed, repeated), of which this host
    encodes only its own rows of each global batch."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, {shard_count})")
    if not records:
        raise ValueError("no training records")
    ds = grain.MapDataset.source(list(records))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # grain reshuffles each repetition: another (seeded) order per epoch
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_Encode(processor, cfg, image_folder, len(records), start_epoch))
    total = len(records) * num_epochs if num_epochs is not None else sys.maxsize // 2
    local = grain.MapDataset.range(_host_length(total, rows, shard_count, shard_index))
    local = local.map(_HostRows(ds, rows, shard_count, shard_index))
    it = local.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=max(2 * num_threads, 1)))
    if num_workers > 0:
        if not absl_flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, use defaults
            absl_flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def _image_shape(processor, cfg) -> tuple[int, int, int]:
    ic = processor.image_config
    return 3, ic.crop_size["height"], ic.crop_size["width"]


def make_train_iterator(records: Sequence[dict], processor, cfg: DataConfig, *, image_folder=None,
                        num_epochs: int | None = None, start_epoch: int = 0, batch_size: int | None = None,
                        shard_index: int = 0, shard_count: int = 1, num_workers: int = 0,
                        num_threads: int = 2) -> DataIterator:
    """Training batches: this host's share of `records`, shuffled per epoch, encoded, batched.

    records: all records (every host passes the same list). They form one global stream, shuffled per epoch;
      host `shard_index` of `shard_count` (pass jax.process_index() / jax.process_count()) reads and encodes
      only its own rows of each global batch of shard_count x batch_size rows: the hosts' shares are disjoint
      and together complete, and the global batches do not depend on the number of hosts (as long as no
      example is dropped: a host replaces a dropped example with its next one).
    num_epochs: None repeats forever (the train loop stops at its step count); epoch e (from start_epoch)
      shuffles with grain's per-repetition permutation of cfg.seed and seeds the markers with e.
    batch_size: rows per batch on this host (default cfg.batch_size).
    num_workers: >0 runs encoding (image decode, markers, preprocessing) in that many grain worker
      processes (`mp_prefetch`), overlapping with the device; 0 runs it in `num_threads` threads of this process.
    cfg.group_by_length > 1 sorts each run of that many of this host's batches by length (each host its own
      rows, so with grouping the global batches do depend on the number of hosts).
    Returns a `DataIterator` (get_state / set_state / stats); each batch has the keys of the module docstring.
    """
    cfg = cfg.resolve(processor)
    b = batch_size or cfg.batch_size
    it = _train_pipeline(records, processor, cfg, image_folder, rows=b, shard_index=shard_index,
                         shard_count=shard_count, num_epochs=num_epochs, start_epoch=start_epoch,
                         num_workers=num_workers, num_threads=num_threads)
    return DataIterator(it, cfg, b, _image_shape(processor, cfg), group=cfg.group_by_length)


def make_eval_iterator(records: Sequence[dict], processor, cfg: DataConfig, *, image_folder=None,
                       batch_size: int | None = None, shard_index: int = 0, shard_count: int = 1,
                       num_workers: int = 0, num_threads: int = 2) -> DataIterator:
    """One pass over this host's share, in order, markers drawn for epoch 0. Every host yields the same number
    of batches, ceil(ceil(len(records) / shard_count) / batch_size), the last ones filled with padding rows
    (labels -100), so hosts never wait on each other's collectives."""
    cfg = dataclasses.replace(cfg.resolve(processor), shuffle=False, cache_examples=False)  # one pass: no reuse
    b = batch_size or cfg.batch_size
    it, _ = _pipeline(records, processor, cfg, image_folder, shard_index=shard_index, shard_count=shard_count,
                      num_epochs=1, start_epoch=0, shuffle=False, num_workers=num_workers, num_threads=num_threads,
                      allow_empty=True)
    per_host = -(-len(records) // shard_count)
    return DataIterator(it, cfg, b, _image_shape(processor, cfg), num_batches=-(-per_host // b))
