//! Progress of slow start-up work, printed for the operator.

use kiln_template::BuildEvent;

pub fn print_build_event(event: BuildEvent) {
    match event {
        BuildEvent::Started {
            template, reason, ..
        } => {
            eprintln!(
                "[template {template}] building ({reason}); the first build takes a few minutes"
            )
        }
        BuildEvent::Step { index, total, name } => {
            eprintln!("[template] step {index}/{total}: {name}")
        }
        BuildEvent::Log { line } => eprintln!("[template]   {line}"),
        BuildEvent::Warning { message } => eprintln!("[template] warning: {message}"),
        BuildEvent::Finished { secs } => eprintln!("[template] ready after {secs:.1} s"),
        other => eprintln!("[template] {other:?}"),
    }
}
