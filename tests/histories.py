"""A run's logged history as plain data, for comparing an interrupted-and-resumed run with an uninterrupted one.

Wall-clock columns (``elapsed_s``, ``tok/s``) differ between any two runs and are left out.
"""

from __future__ import annotations

import csv
from pathlib import Path

TIMING = {"elapsed_s", "tok/s"}


def csv_history(run_dir: Path) -> list[dict[str, str]]:
    """The rows of metrics.csv in order, without the timing columns and without empty cells."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v != "" and k not in TIMING} for row in csv.DictReader(f)]


def tensorboard_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag → [(step, value)] as TensorBoard shows it (events of purged steps dropped), timing tags left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag not in TIMING}


def wandb_offline_records(run_folder: Path) -> list:
    """The protobuf ``Record``s of a W&B offline run (``wandb/offline-run-*/run-<id>.wandb``), in order.

    wandb no longer ships a Python reader for this file: it is a 7-byte header (``:W&B``, magic 0xBEE1,
    version 0) followed by a LevelDB log (32 KiB blocks of chunks, each a 7-byte header: CRC-32C, length,
    type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4), every complete payload one serialised ``Record``.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = next(Path(run_folder).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B" and int.from_bytes(data[4:6], "little") == 0xBEE1
    records, payload, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        length, kind = int.from_bytes(data[offset + 4:offset + 6], "little"), data[offset + 6]
        if kind == 0:  # zero-filled end of the last block
            break
        payload += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(Record.FromString(payload))
            payload = b""
    return records


def wandb_offline_history(run_folder: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of a W&B offline run: each row maps a key ("a/b", or "a/b/_type" inside
    a logged object such as a histogram) to its JSON value."""
    import json

    run_id, config, rows = None, {}, []
    for record in wandb_offline_records(run_folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "config":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.config.update})
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return run_id, config, rows
