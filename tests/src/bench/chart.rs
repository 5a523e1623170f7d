//! The PNG bar chart, one panel per headline figure, like the seed's benchmark.png.
//! Bitmap backend only; text is drawn with ab_glyph from a TrueType font found on
//! the machine (DejaVu Sans, Debian's fonts-dejavu-core). Without one the chart is
//! drawn without text and says so on stderr.
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::report::{NO_PROXY, UDP_KERNEL};
use super::{Results, Workload};

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font for "sans-serif"; false when none could be loaded.
fn load_font() -> bool {
    let candidates = std::env::var("MMPROXY_BENCH_FONT")
        .map(|f| vec![f])
        .unwrap_or_else(|_| FONTS.iter().map(|s| s.to_string()).collect());
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            // Registered fonts live as long as the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

fn color(name: &str, i: usize) -> RGBColor {
    match name {
        NO_PROXY => RGBColor(150, 150, 150),
        "mmproxy" => RGBColor(206, 92, 0),
        UDP_KERNEL => RGBColor(240, 170, 70),
        "go-mmproxy" => RGBColor(0, 125, 156),
        "HAProxy TPROXY" => RGBColor(60, 140, 60),
        _ => [RGBColor(120, 80, 160), RGBColor(180, 60, 120)][i % 2],
    }
}

struct Panel {
    title: &'static str,
    values: Vec<Option<f64>>,
}

pub fn draw(r: &Results, path: &Path) -> Result<()> {
    let text = load_font();
    if !text {
        eprintln!("bench: no TrueType font found (fonts-dejavu-core); the chart has no text");
    }
    let cfgs = &r.configs;
    let per = |w: Workload, m: &str| -> Vec<Option<f64>> {
        cfgs.iter().map(|c| r.get(c, w, m)).collect()
    };
    let panels = [
        Panel {
            title: "TCP throughput, total Mbps (higher is better)",
            values: per(Workload::Throughput, "total_mbps"),
        },
        Panel {
            title: "proxy CPU ms per Gbit (lower is better)",
            values: per(Workload::Throughput, "cpu_ms_per_gbit"),
        },
        Panel {
            title: "connections/s (higher is better)",
            values: per(Workload::ConnRate, "conns_per_s"),
        },
        Panel {
            title: "time per connection, p99 ms (lower is better)",
            values: per(Workload::ConnRate, "p99_ms"),
        },
        Panel {
            title: "ping-pong p99 µs (lower is better)",
            values: per(Workload::Latency, "p99_us"),
        },
        Panel {
            title: "UDP replies/s (higher is better)",
            values: per(Workload::Udp, "replies_per_s"),
        },
        Panel {
            title: "UDP machine CPU µs per reply (lower is better)",
            values: cfgs
                .iter()
                .map(|c| r.machine_per_unit(c, Workload::Udp))
                .collect(),
        },
        Panel {
            title: "UDP: the proxy's extra machine µs/reply",
            values: cfgs
                .iter()
                .map(|c| r.extra_per_unit(c, Workload::Udp))
                .collect(),
        },
        Panel {
            title: "idle connection: proxy RSS KiB (lower is better)",
            values: per(Workload::Idle, "rss_per_conn_kib"),
        },
        Panel {
            title: "idle connection: kernel KiB (lower is better)",
            values: cfgs
                .iter()
                .map(|c| {
                    if c == NO_PROXY {
                        None
                    } else {
                        r.kernel_per_conn_kib(c)
                    }
                })
                .collect(),
        },
    ];

    let root = BitMapBackend::new(path, (1600, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (head, body) = root.split_vertically(60);
    if text {
        let m = &r.machine;
        head.draw_text(
            &format!(
                "cargo xtask bench — medians of {} round{}; {} CPUs ({}), Linux {}",
                r.options.rounds,
                if r.options.rounds == 1 { "" } else { "s" },
                m.nproc,
                m.cpu_model,
                m.kernel
            ),
            &("sans-serif", 22).into_font().color(&BLACK),
            (20, 8),
        )
        .map_err(|e| anyhow!("{e}"))?;
        // Legend.
        let mut x = 20;
        for (i, c) in cfgs.iter().enumerate() {
            head.draw(&Rectangle::new(
                [(x, 38), (x + 14, 52)],
                color(c, i).filled(),
            ))
            .map_err(|e| anyhow!("{e}"))?;
            head.draw_text(
                c,
                &("sans-serif", 16).into_font().color(&BLACK),
                (x + 20, 36),
            )
            .map_err(|e| anyhow!("{e}"))?;
            x += 40 + 9 * c.chars().count() as i32;
        }
    }
    let areas = body.split_evenly((2, 5));
    for (area, p) in areas.iter().zip(&panels) {
        panel(area, p, cfgs, text)?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    p: &Panel,
    cfgs: &[String],
    text: bool,
) -> Result<()> {
    let n = cfgs.len();
    let max = p
        .values
        .iter()
        .flatten()
        .copied()
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    if p.values.iter().all(Option::is_none) {
        if text {
            area.titled(p.title, ("sans-serif", 16))
                .and_then(|a| {
                    a.draw_text(
                        "not measured",
                        &("sans-serif", 14).into_font().color(&BLACK),
                        (40, 40),
                    )
                })
                .map_err(|e| anyhow!("{e}"))?;
        }
        return Ok(());
    }
    let mut b = ChartBuilder::on(area);
    b.margin(12);
    if text {
        b.caption(p.title, ("sans-serif", 16))
            .x_label_area_size(22)
            .y_label_area_size(55);
    }
    let mut chart = b
        .build_cartesian_2d((0..n).into_segmented(), 0.0..max * 1.18)
        .map_err(|e| anyhow!("{e}"))?;
    let short: Vec<String> = cfgs
        .iter()
        // Short enough that five or six labels fit under a panel; the legend has
        // the full names.
        .map(|c| match c.as_str() {
            NO_PROXY => "none".to_owned(),
            "mmproxy" => "mm".to_owned(),
            UDP_KERNEL => "mm tc".to_owned(),
            "go-mmproxy" => "go".to_owned(),
            "HAProxy TPROXY" => "HAP".to_owned(),
            _ => c
                .split_whitespace()
                .next()
                .unwrap_or(c)
                .chars()
                .take(6)
                .collect(),
        })
        .collect();
    let x_fmt = |x: &SegmentValue<usize>| match x {
        SegmentValue::CenterOf(i) => short.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let y_fmt = |y: &f64| compact(*y);
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        mesh.x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .y_labels(5)
            .label_style(("sans-serif", 13));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| anyhow!("{e}"))?;
    for (i, (v, c)) in p.values.iter().zip(cfgs).enumerate() {
        let Some(v) = *v else { continue };
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), v.max(0.0)),
            ],
            color(c, i).filled(),
        );
        bar.set_margin(0, 0, 6, 6);
        chart
            .draw_series(std::iter::once(bar))
            .map_err(|e| anyhow!("{e}"))?;
        if text {
            chart
                .draw_series(std::iter::once(Text::new(
                    compact(v),
                    (SegmentValue::CenterOf(i), v.max(0.0) + max * 0.02),
                    ("sans-serif", 13).into_font().color(&BLACK).pos(
                        plotters::style::text_anchor::Pos::new(
                            plotters::style::text_anchor::HPos::Center,
                            plotters::style::text_anchor::VPos::Bottom,
                        ),
                    ),
                )))
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    Ok(())
}

/// 12345 → "12.3k", 0.42 → "0.42".
fn compact(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
