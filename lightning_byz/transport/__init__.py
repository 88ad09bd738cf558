"""Where the server's messages come from and go to: real MPI ranks (:mod:`.mpi`) or virtual workers in
one process (:mod:`.simulated`). Both speak :mod:`lightning_byz.ps.messages` to the serve loop."""
