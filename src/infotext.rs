//! The generation record that AUTOMATIC1111 writes into a PNG's `parameters` chunk and that its
//! ecosystem (image browsers, civitai, ComfyUI importers) reads back:
//!
//! ```text
//! a red apple
//! Negative prompt: blurry
//! Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15, RNG: CPU, Version: ldm 0.1.0
//! ```

/// Everything needed to reproduce one image.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationInfo {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// The sampler's display name, as A1111 spells it ("DDIM", "DDPM", ...).
    pub sampler: String,
    /// A1111's "Schedule type" ("Karras") when the sampler's sigmas are not the default ones.
    pub schedule_type: Option<String>,
    pub cfg_scale: f64,
    /// diffusers' guidance rescale, recorded when guidance ran and it is not 0.
    pub guidance_rescale: Option<f64>,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: String,
    /// DDIM's eta, recorded when it is not 0.
    pub eta: Option<f64>,
    /// img2img/inpaint strength.
    pub denoising_strength: Option<f64>,
    /// A1111's "Clip skip" (2 = the layer before the last), recorded when it is over 1.
    pub clip_skip: Option<usize>,
    /// The weights' quantization (`--quantize`; it changes the image), when there is one.
    pub quantization: Option<String>,
}

impl GenerationInfo {
    /// The A1111 infotext: prompt, optional negative prompt line, then `key: value` pairs.
    pub fn to_infotext(&self) -> String {
        let mut params = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", self.sampler.clone()),
        ];
        if let Some(schedule) = &self.schedule_type {
            params.push(("Schedule type", schedule.clone()));
        }
        params.extend([
            ("CFG scale", python_float(self.cfg_scale)),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.width, self.height)),
            ("Model", self.model.clone()),
        ]);
        if let Some(strength) = self.denoising_strength {
            params.push(("Denoising strength", python_float(strength)));
        }
        if let Some(clip_skip) = self.clip_skip {
            params.push(("Clip skip", clip_skip.to_string()));
        }
        if let Some(phi) = self.guidance_rescale.filter(|&phi| phi != 0.0) {
            params.push(("Guidance rescale", python_float(phi)));
        }
        if let Some(eta) = self.eta.filter(|&eta| eta != 0.0) {
            params.push(("Eta DDIM", python_float(eta)));
        }
        if let Some(quantization) = &self.quantization {
            params.push(("Quantization", quantization.clone()));
        }
        // Our noise is torch's CPU generator, which is what A1111 calls its CPU RNG.
        params.push(("RNG", "CPU".to_string()));
        params.push(("Version", format!("ldm {}", env!("CARGO_PKG_VERSION"))));
        let params = params
            .into_iter()
            .map(|(key, value)| format!("{key}: {}", quote(&value)))
            .collect::<Vec<_>>()
            .join(", ");
        let negative = if self.negative_prompt.is_empty() {
            String::new()
        } else {
            format!("\nNegative prompt: {}", self.negative_prompt)
        };
        format!("{}{negative}\n{params}", self.prompt)
            .trim()
            .to_string()
    }
}

/// A1111 JSON-quotes a value that contains a separator (`,`, `:` or a newline).
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::to_string(value).expect("a string always serialises")
    } else {
        value.to_string()
    }
}

/// Python's `str(float)` for the values we print: `7.0`, `7.5`, `0.75`.
fn python_float(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e16 {
        format!("{value:.1}")
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> GenerationInfo {
        GenerationInfo {
            prompt: "a red apple".into(),
            negative_prompt: String::new(),
            steps: 50,
            sampler: "DDIM".into(),
            schedule_type: None,
            cfg_scale: 7.0,
            guidance_rescale: None,
            seed: 42,
            width: 512,
            height: 512,
            model: "sd15".into(),
            eta: Some(0.0),
            denoising_strength: None,
            clip_skip: None,
            quantization: None,
        }
    }

    #[test]
    fn matches_the_a1111_layout() {
        let expected = format!(
            "a red apple\nSteps: 50, Sampler: DDIM, CFG scale: 7.0, Seed: 42, Size: 512x512, \
             Model: sd15, RNG: CPU, Version: ldm {}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(info().to_infotext(), expected);
    }

    #[test]
    fn negative_prompt_strength_eta_and_quoting() {
        let mut info = info();
        info.negative_prompt = "blurry, low quality".into();
        info.model = "org/model:v1".into();
        info.eta = Some(0.5);
        info.denoising_strength = Some(0.75);
        info.cfg_scale = 7.5;
        info.guidance_rescale = Some(0.7);
        info.clip_skip = Some(2);
        info.sampler = "DPM++ 2M".into();
        info.schedule_type = Some("Karras".into());
        info.quantization = Some("q8_0".into());
        let text = info.to_infotext();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "a red apple");
        assert_eq!(lines[1], "Negative prompt: blurry, low quality");
        assert!(
            lines[2].contains("Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, "),
            "{text}"
        );
        assert!(lines[2].contains("Model: \"org/model:v1\""), "{text}");
        assert!(
            lines[2].contains(
                "Denoising strength: 0.75, Clip skip: 2, Guidance rescale: 0.7, Eta DDIM: 0.5, \
                 Quantization: q8_0, RNG: CPU"
            ),
            "{text}"
        );
    }
}
