//! `kiln-jail`: builds one jail sandbox and supervises its PID 1. Spawned by the jail
//! runtime; see `kiln_runtime::jail::helper` and `docs/jail.md`.

fn main() -> std::process::ExitCode {
    kiln_runtime::jail::helper::main()
}
