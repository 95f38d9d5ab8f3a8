"""Shard preparation: photos + captions -> WebDataset shards with faces and identity embeddings.

sources (folder tree / existing shards) -> worker (images.process_item: decode, detect, embed, crop)
-> journal (atomic, resumable shard commits) -> manifest.json + skipped.jsonl.  Entry point:
``prepare.prepare_shards(PrepareConfig(...))``; command line: ``python -m data_pipelines.prepare_shards``.
"""
