"""What a run leaves on disk, the read side: committed checkpoints (``checkpoints``) and exports
(``exports``). A leaf: the engine, the stages and the launcher read here; the engine writes."""
