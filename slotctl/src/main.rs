//! `slotctl`: the operator's command line for slotd. All the logic lives in the `slotctl` library.

use clap::Parser;
use slotctl::cli::Cli;

fn main() {
    // Usage errors exit 2 (clap's convention); `--help` and `--version` exit 0.
    let cli = Cli::parse();
    let code = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt.block_on(slotctl::main(cli)),
        Err(e) => {
            eprintln!("slotctl: cannot start the async runtime: {e}");
            1
        }
    };
    std::process::exit(code);
}
