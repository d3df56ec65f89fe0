//! [`Mpi`]: the [`Communicator`] over the system's MPI library (Open MPI or MPICH, through
//! rsmpi), for ranks started by `mpirun`.

use std::sync::Mutex;

use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};

use crate::Result;
use crate::distributed::Communicator;
use crate::distributed::communicator::{check_root, error};

/// MPI's world communicator. Created once per process ([`Mpi::init`]); MPI is finalized when
/// it is dropped. A rank that dies ends the whole job: MPI's default error handler aborts
/// the collective calls, and `mpirun` reports the lost rank and stops the others.
///
/// # Examples
/// ```no_run
/// use candle_functional::distributed::{Communicator, Mpi};
/// // Under `mpirun -np 2 ...`:
/// let comm = Mpi::init()?;
/// let mut ones = [1.0f32; 4];
/// comm.all_reduce_sum_f32(&mut ones)?;
/// assert_eq!(ones, [comm.world_size() as f32; 4]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub struct Mpi {
    // Dropped before the universe (fields drop in order): the communicator must not
    // outlive MPI_Finalize.
    world: SimpleCommunicator,
    _universe: Universe,
    rank: usize,
    world_size: usize,
    /// MPI is initialized `MPI_THREAD_SERIALIZED`: calls may come from any thread, one at a
    /// time; this lock makes it so.
    calls: Mutex<()>,
}

// SAFETY: MPI was initialized with MPI_THREAD_SERIALIZED (checked in `init`), which allows
// calls from any thread as long as no two run at once; every call below holds `calls`.
unsafe impl Send for Mpi {}
// SAFETY: as above: shared access is serialized by `calls`.
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initializes MPI for this process (once: a second call fails) and takes its world
    /// communicator.
    ///
    /// # Examples
    /// ```no_run
    /// let comm = candle_functional::distributed::Mpi::init()?;
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn init() -> Result<Self> {
        let Some((universe, provided)) = mpi::initialize_with_threading(Threading::Serialized)
        else {
            return Err(crate::Error::InvalidArgument(
                "MPI is already initialized in this process: create one Mpi and share it".into(),
            ));
        };
        let world = universe.world();
        let comm = Self {
            rank: world.rank() as usize,
            world_size: world.size() as usize,
            world,
            _universe: universe,
            calls: Mutex::new(()),
        };
        if !matches!(provided, Threading::Serialized | Threading::Multiple) {
            return Err(error(
                &comm,
                format!(
                    "the MPI library provides {provided:?} threading; serialized calls from the training thread need MPI_THREAD_SERIALIZED"
                ),
            ));
        }
        Ok(comm)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A poisoned lock only means another thread panicked between calls: MPI itself holds
        // no state that the lock protects.
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> &str {
        "mpi"
    }

    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let send = values.to_vec();
        let _guard = self.lock();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let send = values.to_vec();
        let _guard = self.lock();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn broadcast_f32(&self, values: &mut [f32], root: usize) -> Result<()> {
        check_root(self, root)?;
        let _guard = self.lock();
        self.world
            .process_at_rank(root as i32)
            .broadcast_into(values);
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut [u8], root: usize) -> Result<()> {
        check_root(self, root)?;
        let _guard = self.lock();
        self.world
            .process_at_rank(root as i32)
            .broadcast_into(bytes);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let _guard = self.lock();
        self.world.barrier();
        Ok(())
    }
}
