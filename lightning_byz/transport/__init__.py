"""How vectors travel between workers and the server: real MPI (:mod:`.mpi`) or one process
(:mod:`.simulated`)."""
