//! Pipelined async NBD client (issue 3).
