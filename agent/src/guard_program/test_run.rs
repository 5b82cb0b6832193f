//! Running the guard on a packet in the kernel without sending it (BPF_PROG_TEST_RUN): for
//! the packet tests, the benchmarks and the fuzzer, never on the agent's own path.

use aya::programs::{TestRun, TestRunOptions};

use super::{BpfError, GuardProgram, Layout};

impl GuardProgram {
    /// Runs the Ethernet guard once on `packet` in the kernel (BPF_PROG_TEST_RUN); returns the
    /// XDP action. The packet is not sent anywhere.
    pub fn run_packet(&mut self, packet: &[u8]) -> Result<u32, BpfError> {
        self.run_packet_as(Layout::Ethernet, packet)
    }

    /// [`GuardProgram::run_packet`] with the guard for frames of `layout`.
    pub fn run_packet_as(&mut self, layout: Layout, packet: &[u8]) -> Result<u32, BpfError> {
        let program = self.guard_program(layout)?;
        let mut out = vec![0u8; packet.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .map_err(BpfError::TestRun)?;
        Ok(result.return_value)
    }

    /// Runs the guard `repeat` times on `packet` in the kernel, for benchmarks; returns the
    /// XDP action and the kernel's average time per run (whole nanoseconds).
    pub fn time_packet(
        &mut self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), BpfError> {
        let program = self.guard_program(Layout::Ethernet)?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat,
                ..TestRunOptions::new()
            })
            .map_err(BpfError::TestRun)?;
        Ok((result.return_value, result.duration))
    }
}
