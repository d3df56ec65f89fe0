//! oneDNN's OpenMP threads, told to sleep when they have no work (builds with `onednn`).
//!
//! The `onednn` feature runs convolutions on oneDNN, whose Debian build schedules them on
//! OpenMP (libgomp) threads; everything else in a step runs on rayon's threads. Left to its
//! default, an idle OpenMP thread spins (300,000 iterations, milliseconds) after each
//! convolution, on the cores the next batch-norm or ReLU needs: on 2 cores, spinning
//! (`active`), a training step of the full ResNet took 33% longer than with `passive`, the
//! shrunken one's 63% (docs/PERFORMANCE.md).
//! libgomp reads its policy from the environment once, when the process starts, so
//! [`wait_passively`] restarts the example with `OMP_WAIT_POLICY=passive` unless the variable
//! is already set (to any value: yours wins). A binary of your own that uses the feature
//! should be started the same way.

/// Re-executes this process with `OMP_WAIT_POLICY=passive` when the `onednn` feature is on
/// and the variable is unset; returns (doing nothing) otherwise, or if the restart fails.
pub fn wait_passively() {
    #[cfg(all(feature = "onednn", unix))]
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        use std::os::unix::process::CommandExt;
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        // `exec` returns only on failure; the example then runs on with spinning threads.
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("OMP_WAIT_POLICY", "passive")
            .exec();
        eprintln!("could not restart with OMP_WAIT_POLICY=passive ({err}); continuing without");
    }
}
