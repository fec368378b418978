"""Weight-block tables: one Parquet file per zoo member, a consolidated members manifest.

On-storage layout of a zoo (``<root>`` = the zoo URI, a local folder, ``file://`` or ``s3://``)::

    <root>/layout.json                                   WeightLayout (written once)
    <root>/blocks/task=<task_id>/member=<member_id>.parquet   all kept checkpoints of one member
    <root>/members/<member_id>.json                      manifest entry, written after its file
    <root>/failures/<member_id>.json                     members that kept failing, with the error
    <root>/_manifest/CURRENT                             {"version": N, "snapshot": ...}
    <root>/_manifest/snapshot-<N>.parquet                consolidated entries (+ the entry mtimes)
    <root>/compacted/v<N>/part-<k>.parquet               files written by compaction

Visibility rules, which make partial writes invisible and reads cheap at 10^4-10^5 members:

* a member exists only once its entry ``members/<id>.json`` exists, and that entry is written only
  after its blocks file is complete (single PUT on S3, write + rename locally);
* :func:`open_zoo` reads ``CURRENT`` and its snapshot, then *lists* ``members/`` and ``blocks/``
  (one request per 1000 keys) and GETs only entries that are newer than the snapshot: no request
  per member, and readers plan reads from the explicit file list, never by listing for data;
* compaction writes the new large files, then a new snapshot, then swaps ``CURRENT`` (one atomic
  object write): a reader sees the old files or the new ones, never a mix;
* compaction deletes nothing: :func:`vacuum_zoo` (``rayweights vacuum``) deletes the files that no
  manifest current within the retention window references, once they are older than the window
  (readers must finish within it), and old snapshots; outside readers read
  :func:`live_files` (``rayweights zoo-files``), never a glob of ``blocks/**``.

Integrity: every manifest entry records its file's ``sha256`` and ``size`` (bytes) and the
member's ``num_rows``.  :meth:`Zoo.verify` checks the live files against them (``level="footer"``:
Parquet footer and row count, one small read per file, the training pre-flight; ``"checksum"``:
the whole file's sha256 as well, ``rayweights zoo-info --verify`` and a build's resume, which
rebuilds exactly the members that fail).  A manifest entry that cannot be parsed is reported by
name (:attr:`Zoo.corrupt_entries`) and left out; the rest of the zoo stays readable.

Rows (one per weight block): ``zoo, task_id, condition, member_id, seed, checkpoint (int32),
group (int32), block_index (int32, global), block (fixed_size_list<float32>[block_size])``.

Modules: :mod:`.format` (file names, schemas, records), :mod:`.reader` (:func:`open_zoo`, :class:`Zoo`,
compaction), :mod:`.vacuum` (retention, the live file list), :mod:`.writer` (:class:`ZooWriter`,
:func:`retokenize`), :mod:`.cli` (``zoo-info``, ``compact``, ``vacuum``, ``zoo-files``).
"""

from .cli import compact_main, files_main, info_main, vacuum_main
from .format import BadMember, CheckpointRecord, ZooError, block_schema
from .reader import Zoo, compact_zoo, open_zoo
from .vacuum import DEFAULT_RETAIN_SECONDS, VacuumReport, duckdb_source, live_files, vacuum_zoo
from .writer import ZooWriter, retokenize

__all__ = ["ZooWriter", "CheckpointRecord", "open_zoo", "Zoo", "ZooError", "BadMember", "compact_zoo", "block_schema",
           "retokenize", "vacuum_zoo", "VacuumReport", "DEFAULT_RETAIN_SECONDS", "live_files", "duckdb_source",
           "info_main", "compact_main", "vacuum_main", "files_main"]
