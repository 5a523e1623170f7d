//! Writes the man page and the shell completions from the clap definition in
//! `mmproxy::cli`, so they never drift from `--help`. Run by `cargo xtask dist`:
//! `cargo run --example dist_docs -- OUT_DIR` writes `OUT_DIR/mmproxy.1` and
//! `OUT_DIR/completions/{mmproxy.bash,_mmproxy,mmproxy.fish}`.
use std::fs;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap_complete::Shell;

/// What clap cannot say: go-mmproxy's spellings, signals, the files the package
/// installs. Appended to clap_mangen's page as plain roff.
const EXTRA_SECTIONS: &str = r#".SH "GO-MMPROXY SPELLINGS"
As with go-mmproxy, every flag may be written with one or two dashes and with
its value after a space or an equals sign:
\fB-allowed-subnets\fR \fIPATH\fR, \fB--l=\fR\fIADDR:PORT\fR and \fB-mark=1\fR are
accepted, so go-mmproxy's unit files work unchanged.
.SH SIGNALS
.TP
\fBSIGHUP\fR
Re-reads the \fB--allowed-subnets\fR file; a bad file keeps the previous list.
.TP
\fBSIGUSR1\fR
Logs the counters at once.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop accepting, remove the routes, rules and BPF programs mmproxy installed,
and let live connections finish within \fB--shutdown-grace\fR.
.SH FILES
.TP
\fI/etc/mmproxy/mmproxy.conf\fR
The flags of \fBmmproxy.service\fR (\fBDAEMON_ARGS=\fR).
.TP
\fI/etc/mmproxy/NAME.conf\fR
The flags of the instance \fBmmproxy@NAME.service\fR.
.TP
\fI/etc/mmproxy/allowed-subnets.txt\fR
Proxies allowed to connect, one CIDR per line; empty as shipped (nobody).
.TP
\fI/run/mmproxy\fR
Lease files shared by the instances of a network namespace.
.SH "SEE ALSO"
\fBsystemd.exec\fR(5), \fBip-rule\fR(8), \fBbpftool\fR(8)
"#;

fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .context("usage: dist_docs OUT_DIR")?,
    );
    let completions = out.join("completions");
    fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;

    let mut page = Vec::new();
    clap_mangen::Man::new(mmproxy::cli::command())
        .render(&mut page)
        .context("rendering the man page")?;
    page.write_all(EXTRA_SECTIONS.as_bytes())?;
    let man = out.join("mmproxy.1");
    fs::write(&man, page).with_context(|| format!("writing {}", man.display()))?;

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = mmproxy::cli::command();
        clap_complete::generate_to(shell, &mut cmd, "mmproxy", &completions)
            .with_context(|| format!("writing the {shell} completion"))?;
    }
    Ok(())
}
