import torch


def apply_masks(x, masks):
    """Gather the kept tokens of `x` for each mask and stack them along the batch.

    :param x: tensor [B, N, D]
    :param masks: list of LongTensors [B, K] with the indices (in [0, N)) of the tokens to keep
    :returns: tensor [len(masks) * B, K, D], mask-major (all images for masks[0], then masks[1], ...)
    """
    all_x = []
    for m in masks:
        ids_keep = m.unsqueeze(-1).expand(-1, -1, x.size(-1))                   # (B, K, D), a view
        all_x.append(torch.gather(x, dim=1, index=ids_keep))
    return all_x[0] if len(all_x) == 1 else torch.cat(all_x, dim=0)


def seed_from(*values):
    """A 63-bit seed that mixes integers (e.g. global seed, rank, step) reproducibly across processes."""
    import hashlib
    digest = hashlib.blake2b(repr(tuple(int(v) for v in values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') >> 1


class BatchCounter:
    """Numbers the batches a collator sees, as ijepa's shared counter does, deterministically when asked.

    ijepa increments one `multiprocessing.Value` shared by all data-loader workers; which worker takes the next
    value is a race, so batch j does not always get value j. With `deterministic=True`, a collator running in a
    worker instead counts for itself: the DataLoader hands batches to its W workers round-robin, so worker k
    collates batches k, k + W, k + 2W, ... of the iterator, starting after the counter's value when the iterator
    was created. In the main process (num_workers=0) both ways give 0, 1, 2, ...
    Call `set_step(s)` before creating a data-loader iterator whose first batch is global step `s`, and use
    non-persistent workers.
    """

    def __init__(self, deterministic=False):
        from multiprocessing import Value
        self._itr_counter = Value('i', -1)  # shared across worker processes; first step() returns 0
        self.deterministic = deterministic
        self._worker_next = None

    def step(self):
        i = self._itr_counter
        with i.get_lock():
            i.value += 1
            v = i.value
        return v

    def set_step(self, step):
        """The next batch (in the main process, or the first batch of a new iterator's workers) is `step`."""
        with self._itr_counter.get_lock():
            self._itr_counter.value = step - 1
        self._worker_next = None

    def next_batch_step(self):
        info = torch.utils.data.get_worker_info()
        if info is None or not self.deterministic:
            return self.step()
        if self._worker_next is None:
            self._worker_next = self._itr_counter.value + 1 + info.id
        v = self._worker_next
        self._worker_next += info.num_workers
        return v
