"""Our checkpoints: ``manager`` (orbax saves and restores, ``orbax_setup`` its options), ``arrays`` (a step folder read
by array name), ``integrity`` (the crc32 manifest), ``folder_lock`` (the writer lock), ``step_folders`` (which folders
are steps), ``plan`` (what a run starts from, decided before compiling), ``start`` (that state built on the mesh) and
``stop_file`` (``ckpt.stop_file_path``)."""
