//! A1111's sampler names ("Euler a", "DPM++ 2M Karras", ...) for the samplers ldm has.

use super::error::ApiError;
use crate::schedulers::SamplerKind;

/// One sampler as A1111 lists it: its name, old k-diffusion aliases, what it runs.
pub struct NamedSampler {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub kind: SamplerKind,
    pub karras: bool,
}

/// Every name served, in A1111's order.
pub const SAMPLERS: &[NamedSampler] = &[
    named("DPM++ 2M", &["k_dpmpp_2m"], SamplerKind::DpmPp2m, false),
    named(
        "DPM++ 2M Karras",
        &["k_dpmpp_2m_ka"],
        SamplerKind::DpmPp2m,
        true,
    ),
    named(
        "DPM++ 2M SDE",
        &["k_dpmpp_2m_sde"],
        SamplerKind::DpmPp2mSde,
        false,
    ),
    named(
        "DPM++ 2M SDE Karras",
        &["k_dpmpp_2m_sde_ka"],
        SamplerKind::DpmPp2mSde,
        true,
    ),
    named(
        "Euler a",
        &["k_euler_a", "k_euler_ancestral"],
        SamplerKind::EulerA,
        false,
    ),
    named("Euler", &["k_euler"], SamplerKind::Euler, false),
    named("DDIM", &[], SamplerKind::Ddim, false),
    named("DDPM", &[], SamplerKind::Ddpm, false),
];

const fn named(
    name: &'static str,
    aliases: &'static [&'static str],
    kind: SamplerKind,
    karras: bool,
) -> NamedSampler {
    NamedSampler {
        name,
        aliases,
        kind,
        karras,
    }
}

/// The sampler an A1111 name (or alias, or the CLI's spelling) means, any case, and whether it
/// asks for Karras sigmas.
pub fn find(field: &str, name: &str) -> Result<(SamplerKind, bool), ApiError> {
    let wanted = name.trim();
    SAMPLERS
        .iter()
        .find(|s| {
            s.name.eq_ignore_ascii_case(wanted)
                || s.aliases.iter().any(|a| a.eq_ignore_ascii_case(wanted))
        })
        .map(|s| (s.kind, s.karras))
        .or_else(|| wanted.parse::<SamplerKind>().ok().map(|kind| (kind, false)))
        .ok_or_else(|| {
            let names: Vec<&str> = SAMPLERS.iter().map(|s| s.name).collect();
            ApiError::invalid(
                field,
                format!(
                    "unknown sampler {name:?} (choose one of: {})",
                    names.join(", ")
                ),
            )
        })
}

/// A1111 1.9's separate `scheduler` field: "Automatic" keeps the sampler's own spacing,
/// "Karras" asks for Karras sigmas; ldm has no other.
pub fn schedule(field: &str, scheduler: Option<&str>) -> Result<bool, ApiError> {
    match scheduler.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("automatic") => Ok(false),
        Some("karras") => Ok(true),
        Some(other) => Err(ApiError::invalid(
            field,
            format!("unknown schedule type {other:?} (choose Automatic or Karras)"),
        )),
    }
}

/// The A1111 name of what runs.
pub fn a1111_name(kind: SamplerKind, karras: bool) -> String {
    match SAMPLERS
        .iter()
        .find(|s| s.kind == kind && s.karras == karras)
    {
        Some(sampler) => sampler.name.to_string(),
        None => format!("{} Karras", kind.display_name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn a1111_names_aliases_and_cli_spellings_resolve() {
        assert_eq!(find("s", "Euler a"), Ok((SamplerKind::EulerA, false)));
        assert_eq!(
            find("s", "dpm++ 2m karras"),
            Ok((SamplerKind::DpmPp2m, true))
        );
        assert_eq!(
            find("s", "k_dpmpp_2m_sde_ka"),
            Ok((SamplerKind::DpmPp2mSde, true))
        );
        assert_eq!(find("s", "euler_a"), Ok((SamplerKind::EulerA, false)));
        let error = find("sampler_name", "LMS").unwrap_err();
        assert!(error
            .message
            .starts_with("sampler_name: unknown sampler \"LMS\""));
        assert!(error.message.contains("DPM++ 2M Karras"), "{error:?}");
        assert_eq!(schedule("scheduler", Some("Karras")), Ok(true));
        assert!(schedule("scheduler", Some("Exponential")).is_err());
        assert_eq!(a1111_name(SamplerKind::DpmPp2m, true), "DPM++ 2M Karras");
        assert_eq!(a1111_name(SamplerKind::Euler, true), "Euler Karras");
    }

    #[test]
    fn every_sampler_kind_has_a_name() {
        for kind in SamplerKind::value_variants() {
            assert!(
                SAMPLERS.iter().any(|s| s.kind == *kind && !s.karras),
                "{kind}"
            );
        }
    }
}
